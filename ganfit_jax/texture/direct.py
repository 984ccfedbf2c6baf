"""A prior-free texture: the UV map's own texels are the latent.

Not GANFIT's texture model (that is the GAN of `texture.model`); this is the fallback that lets
the fitting run on a fresh machine before any GAN or PCA texture model has been trained, and the
"no texture prior" ablation. The latent holds a coarse UV map in logit space (so colours stay in
(0,1) without clipping), bilinearly upsampled to the output resolution; its coarseness is the
only regulariser, which is why unobserved texels keep their initial skin tone.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SKIN_TONE = (0.78, 0.60, 0.50)


@flax.struct.dataclass
class DirectUVTexture:
    coarse: int = flax.struct.field(pytree_node=False, default=32)
    resolution: int = flax.struct.field(pytree_node=False, default=128)
    # Adam moves texels this many logits per unit step: without a prior, the identity network's
    # gradients would otherwise paint adversarial colour noise into the map
    step_scale: float = flax.struct.field(pytree_node=False, default=0.1)

    @property
    def latent_dim(self) -> int:
        return self.coarse * self.coarse * 3

    def generate(self, p_t):
        p_t = jnp.asarray(p_t, jnp.float32)
        if p_t.shape != (self.latent_dim,):
            raise ValueError(f"p_t: expected shape ({self.latent_dim},), got {tuple(p_t.shape)}")
        coarse = jax.nn.sigmoid(p_t.reshape(self.coarse, self.coarse, 3))
        return jax.image.resize(coarse, (self.resolution, self.resolution, 3), "linear")

    def latent_from_uv(self, uv_map, mask):
        """The latent whose map best matches an unwrapped photo (texels with mask > 0),
        unseen texels at the skin tone: a start for stage 2 that already looks like the face."""
        uv_map = np.asarray(uv_map, np.float32)
        weight = (np.asarray(mask, np.float32) > 0).astype(np.float32)[..., None]
        size = (self.coarse, self.coarse)
        colour = np.asarray(jax.image.resize(uv_map * weight, size + (3,), "linear"))
        seen = np.asarray(jax.image.resize(weight, size + (1,), "linear"))
        coarse = np.where(seen > 0.05, colour / np.maximum(seen, 1e-6), np.asarray(SKIN_TONE))
        coarse = np.clip(coarse, 0.02, 0.98)
        return jnp.asarray(np.log(coarse / (1 - coarse)).reshape(-1), jnp.float32)

    def init_latent(self, key=None):
        del key
        logit = np.log(np.asarray(SKIN_TONE) / (1 - np.asarray(SKIN_TONE)))
        return jnp.asarray(np.tile(logit, self.coarse * self.coarse), jnp.float32)
