"""The batch schema: the keys a batch carries from the loader (data/pipeline.py) through the text
inputs (training/text_inputs.py) to the train step (training/step.py), and which are optional.

A loader batch of n examples (this process's part of the global batch):
  CAPTION  str [n]           the caption drawn for each example
  INDEX    int64 [n]         the record index
  BAD      int32 [n]         1 where the slot's own record was unusable and the next one was used
  IMAGE    f32 [n,H,W,3]     in [-1, 1]; H = W = data.image_size, or a bucket's (data/buckets.py);
                             absent when the records' cached latents are used
  LATENTS  f32 [n,h,w,c] x2  posterior mean and log-variance (tools.prepare --autoencoder)
  ORIG_SIZE int32 [n, 2]     aspect-ratio buckets only (data/buckets.py): the image's (height,
                             width) before resizing, and
  CROP_OFFSET int32 [n, 2]   the crop's (top, left) in the resized image (SDXL's conditions)
  EMBEDDINGS                 a frozen encoder's outputs stored in the records (tools.prepare
                             --text_encoder): emb [n,L,D], mask [n,L], pooled [n,D]

What the train step takes: BAD, one of IMAGE or LATENTS, and one of TOKENS ([n, L] int32, encoded
in the step) or EMBEDDINGS.
"""

CAPTION = 'caption'
INDEX = 'index'
BAD = 'bad'
IMAGE = 'image'
LATENTS = ('latent_mean', 'latent_logvar')
TOKENS = 'tokens'
EMBEDDINGS = ('emb', 'mask', 'pooled')
TEXT = (TOKENS,) + EMBEDDINGS  # Either the first or the other three.
ORIG_SIZE = 'orig_size'
CROP_OFFSET = 'crop_offset'
GEOMETRY = (ORIG_SIZE, CROP_OFFSET)
STORED = EMBEDDINGS + LATENTS  # Per-example arrays a record may carry, stacked as they are.


def image_keys(cached_latents: bool) -> tuple[str, ...]:
  """The keys of what the network's input is made from: the images, or the cached latents."""
  return LATENTS if cached_latents else (IMAGE,)
