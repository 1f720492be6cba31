"""Rotary position embeddings in the HF `rotate_half` layout (no q/k permutation for HF weights)."""
import jax.numpy as jnp


def rope_cos_sin(positions, head_dim: int, theta: float):
    """positions [..., T] (int) -> cos, sin [..., T, head_dim] in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """x [B, T, H, D]; cos, sin [B, T, D] or [T, D]. Computed in float32, returned in x.dtype."""
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    xf = x.astype(jnp.float32)
    out = xf * cos[:, :, None, :] + rotate_half(xf) * sin[:, :, None, :]
    return out.astype(x.dtype)
