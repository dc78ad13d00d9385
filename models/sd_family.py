"""The 'sd' model family: Stable Diffusion's U-Net, read from a diffusers pipeline folder.

`model.pretrained` names the folder (configs/pipeline.py fills the rest of the config from it);
its `unet/config.json` fixes the architecture, `model.dtype`, `model.param_dtype` and
`model.remat` say how to compute with it, and a run that starts from scratch starts from the
folder's weights. The module takes diffusers' discrete timestep as its noise input.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn

from models import lora

UNET = 'unet'  # The U-Net's sub-folder of a pipeline folder.
_RUN_FIELDS = ('dtype', 'param_dtype', 'remat', 'attention')  # model.* fields the 'sd' family reads.


@dataclasses.dataclass(frozen=True)
class SDSpec:
  """A pretrained Stable Diffusion U-Net: its architecture and where its weights are."""
  network: Any  # models.sd_unet.SDUNetSpec, from FOLDER/unet/config.json and the run fields.
  folder: str   # The pipeline folder (model.pretrained), absolute.

  @property
  def unet_folder(self) -> str:
    return os.path.join(self.folder, UNET)


def read_spec(section: dict[str, Any]) -> SDSpec:
  """The 'sd' spec of the config's `model` section (after configs/pipeline.py filled it)."""
  from models import sd_unet  # pylint: disable=import-outside-toplevel
  folder = section.get('pretrained') or ''
  if not folder:
    raise ValueError("model.family='sd' needs model.pretrained: a diffusers Stable Diffusion "
                     'folder (model_index.json, unet/, text_encoder/, tokenizer/, vae/, '
                     'scheduler/); see docs/stable_diffusion.md.')
  config_path = os.path.join(folder, UNET, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} not found: the pipeline folder has no U-Net config.')
  with open(config_path) as f:
    cfg = json.load(f)
  run = {name: section[name] for name in _RUN_FIELDS}
  network = sd_unet.spec_from_config(cfg, config_path, **run)
  adapters = lora.LoRASpec(**dict(section.get('lora') or {'rank': 0, 'alpha': 0.0, 'targets': (),
                                                           'dropout': 0.0}))
  if adapters.enabled:
    network = dataclasses.replace(network, lora=adapters)
  return SDSpec(network, os.path.abspath(folder))


def build(spec: SDSpec, side: int) -> nn.Module:
  del side  # The SD U-Net's attention is fixed by its config, whatever the size.
  from models import sd_unet  # pylint: disable=import-outside-toplevel
  return sd_unet.SDUNet(spec.network)


def check_image_size(spec: SDSpec, size: int, name: str, *, vae_factor: int = 1,
                     attention: bool = True) -> None:
  del attention
  from models import sd_loading  # pylint: disable=import-outside-toplevel
  halvings = spec.network.num_downsamplers
  if not isinstance(size, bool) and isinstance(size, int) and size % (vae_factor << halvings):
    raise ValueError(f'{name}={size} must be divisible by {vae_factor << halvings}: the '
                     f"autoencoder's factor {vae_factor} x 2**{halvings}, as the SD U-Net "
                     f'({spec.network.source}) halves the latents {halvings} times '
                     '(len(block_out_channels) - 1).')
  sd_loading.check_sample_side(spec.network, size // vae_factor, name)


def pretrained(spec: SDSpec) -> Callable[[], Any]:
  """Loads the folder's U-Net weights when called (a fresh run's start; never on resume)."""
  def load():
    from models import sd_loading  # pylint: disable=import-outside-toplevel
    _, params = sd_loading.load_sd_unet(spec.unet_folder, **{
        name: getattr(spec.network, name) for name in _RUN_FIELDS})
    return params  # The base network's (with LoRA, the frozen weights under the adapters).
  return load
