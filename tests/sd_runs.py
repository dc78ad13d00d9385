"""Shared by the Stable Diffusion run tests: a tiny random pipeline folder with a folder of
captioned images, and configs/sd.py:tiny pointed at them."""
from configs import sd
from tests import image_folders
from tools import make_sd_pipeline


def pipeline_and_images(root) -> tuple[str, str]:
  """(a random SD-1.x-like pipeline folder, a folder of captioned images) under `root`."""
  folder = make_sd_pipeline.write_pipeline(str(root / 'pipeline'), preset='sd1')
  image_folders.make_folder(root / 'images', broken=False)
  return folder, str(root / 'images')


def tiny_config(folder, data, **changes):
  """configs/sd.py:tiny on `folder` and `data`; changes as section__field=value (lora__rank=2
  sets model.lora.rank)."""
  config = sd.get_config('tiny')
  config.model.pretrained = folder
  config.data.path = data
  config.logging.eval_at_end = False
  for key, value in changes.items():
    *path, field = key.split('__')
    section = config.model.lora if path == ['lora'] else config[path[0]]
    section[field] = value
  return config
