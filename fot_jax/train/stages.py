"""The training stages as the loop asks them: which stage trains the next step, whether the stage
ends after a step (at its until_step, or at its until_accuracy: the mean training accuracy of its
last three progress lines), and the record of the stages run, which a checkpoint carries so that a
resumed run continues the same stage at the same point."""
from __future__ import annotations

import numpy as np

from fot_jax import config as config_lib


class StageSchedule:
    """The stages of a run (`config.build_stages`) and where the run is in them."""

    def __init__(self, stages: list[config_lib.Stage]):
        self.stages = stages
        self.current: config_lib.Stage | None = None
        self.start = 0                    # the step the current stage began at
        self.ends: list[dict] = []        # [{name, start, end, reason}] of the stages that ended
        self.accuracies: list[float] = []  # the current stage's progress-line training accuracies

    def begin(self, stage: config_lib.Stage, step: int) -> None:
        self.current, self.start, self.accuracies = stage, step, []

    def resume(self, data_state: dict | None, step: int) -> bool:
        """Continues where a checkpoint's data state says (True), or, without stage records, at the
        stage that trains `step` by until_step (False)."""
        if data_state is None or "stage" not in data_state:
            self.begin(config_lib.stage_at(self.stages, step), step)
            return False
        # an earlier schema's range switch counts as the stage after the curriculum's
        index = int(data_state["stage"]) + int(bool(data_state.get("switched", False)))
        self.begin(self.stages[min(index, len(self.stages) - 1)], int(data_state.get("stage_start", step)))
        self.ends = list(data_state.get("stage_ends", []))
        self.accuracies = list(data_state.get("acc_window", []))
        return True

    def note_accuracy(self, accuracy: float) -> None:
        """The training accuracy of a progress line (what until_accuracy is measured on)."""
        self.accuracies.append(float(accuracy))

    def end_reason(self, done: int, progress_written: bool) -> str | None:
        """Why the current stage ends after step `done` (None: it goes on). The accuracy rule is
        checked on steps that wrote a progress line."""
        stage = self.current
        recent = self.accuracies[-3:]
        if done >= stage.until_step:
            return f"until_step {stage.until_step}"
        if (stage.until_accuracy and progress_written and len(recent) == 3
                and np.mean(recent) >= stage.until_accuracy):
            return f"train accuracy {np.mean(recent):.3f} >= {stage.until_accuracy:g}"
        return None

    def end(self, done: int, reason: str) -> config_lib.Stage | None:
        """Records the end of the current stage; returns the next stage (None after the last)."""
        stage = self.current
        self.ends.append({"name": stage.name, "start": self.start, "end": done, "reason": reason})
        return self.stages[stage.index + 1] if stage.index + 1 < len(self.stages) else None

    def state(self) -> dict:
        """What a checkpoint keeps of the schedule."""
        return {"stage": self.current.index, "stage_start": self.start, "stage_ends": self.ends,
                "acc_window": [float(a) for a in self.accuracies[-3:]]}

    def summary(self, step: int, finished: bool, stopped_by: str | None) -> list[dict]:
        """The stages run, the current one included (ended by train.steps when `finished`)."""
        ends = list(self.ends)
        if not ends or ends[-1]["name"] != self.current.name:
            ends.append({"name": self.current.name, "start": self.start, "end": step,
                         "reason": "train.steps" if finished else (stopped_by or "stopped")})
        return ends
