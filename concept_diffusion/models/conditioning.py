"""How the concept tokens enter the UNet: a registry of conditionings (`unet.conditioning` names one).

A conditioning is a Linen module built as `cls(emb_dim=..., dtype=..., name="conditioning")` and called on the
tokens (B, N, token_dim). It returns `TokenRoutes`, the three doors the UNet has for them:

  context  (B, N, D)  keys/values of every SpatialTransformer's cross-attention (None: self-attention + MLP only)
  adagn    (B, F)     scales every ResBlock's normalised features, Diff-AE's AdaGN (None: no such layer)
  emb      (B, E)     added to the timestep embedding, E = emb_dim (None: nothing added)

A module without parameters adds nothing to the UNet's parameter tree, so the built-ins keep the official names.
docs/extending.md registers a new one.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from concept_diffusion import config as config_lib


class TokenRoutes(NamedTuple):
  context: Optional[jax.Array] = None
  adagn: Optional[jax.Array] = None
  emb: Optional[jax.Array] = None


CONDITIONINGS: dict[str, type[nn.Module]] = {}


def register_conditioning(name: str, cls: type[nn.Module], *,
                          defaults: ml_collections.ConfigDict | dict | None = None,
                          override: bool = False) -> type[nn.Module]:
  """Makes `cls` available as `unet.conditioning=name`. Returns `cls` (usable as a decorator's body).

  `defaults` become the fields `config.unet.<name>.*` (e.g. --config.unet.<name>.hidden=32); the UNet passes them
  to `cls` as keyword arguments, so each is also an attribute of the module."""
  if defaults is not None:
    config_lib.add_extension_fields("unet", name, defaults)
  if name in CONDITIONINGS and CONDITIONINGS[name] is not cls and not override:
    raise ValueError(f"conditioning {name!r} is already registered ({CONDITIONINGS[name].__name__}); pick another "
                     "name or pass override=True.")
  CONDITIONINGS[name] = cls
  return cls


def conditioning_options(unet_config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The chosen conditioning's own fields (config.unet.<name>.*) as sorted (key, value) pairs: the UNet's keyword
  arguments for it, hashable as a Linen attribute must be. () for a conditioning without fields."""
  options = unet_config.get(unet_config.conditioning)  # a conditioning registered without defaults has none
  if not isinstance(options, ml_collections.ConfigDict):
    return ()
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.to_dict().items()))


class CrossAttention(nn.Module):
  """The paper's model (official): the tokens are the keys and values of every cross-attention layer."""
  emb_dim: int
  dtype: Any = jnp.float32

  def __call__(self, tokens: jax.Array) -> TokenRoutes:
    return TokenRoutes(context=tokens)


class AdaGN(nn.Module):
  """Paper Table 3 "EncDiff w/ AdaGN": the tokens, concatenated into one vector, scale every ResBlock's
  normalised features (Diff-AE); the transformers lose their cross-attention and keep self-attention + MLP."""
  emb_dim: int
  dtype: Any = jnp.float32

  def __call__(self, tokens: jax.Array) -> TokenRoutes:
    return TokenRoutes(adagn=tokens.reshape(tokens.shape[0], -1))


class Unconditional(nn.Module):
  """No path from the tokens into the UNet: a control in which the encoder receives no gradient at all."""
  emb_dim: int
  dtype: Any = jnp.float32

  def __call__(self, tokens: jax.Array) -> TokenRoutes:
    del tokens
    return TokenRoutes()


register_conditioning("cross_attention", CrossAttention)
register_conditioning("adagn", AdaGN)
register_conditioning("none", Unconditional)
