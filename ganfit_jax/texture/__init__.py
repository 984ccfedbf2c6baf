"""Texture models of GANFIT: ProGAN generator in UV space (Eq. 5), PCA baseline (Eq. 1),
GAN inversion (Sec. 3.1) and the UV-map folder loader. See model.py for the shared interface."""

from ganfit_jax.texture.model import (GANTexture, PCATexture, TextureModel, generate, gan_from_bytes,
                                      gan_to_bytes, load_gan, load_pca, load_texture_model,
                                      random_texture_model, save_pca, VertexPCATexture)
from ganfit_jax.texture.progan import ProGANConfig
from ganfit_jax.texture.inversion import invert, masked_l1
from ganfit_jax.texture.pca import build_masked_pca, project

__all__ = ["GANTexture", "PCATexture", "TextureModel", "ProGANConfig", "generate", "gan_from_bytes",
           "gan_to_bytes", "load_gan", "load_pca", "load_texture_model", "random_texture_model",
           "save_pca", "VertexPCATexture", "invert", "masked_l1", "build_masked_pca", "project"]
