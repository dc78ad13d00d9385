"""Base configuration: every field the trainer reads, with its default and meaning.

Variants (`configs/shapes.py`, ...) import this and override a few lines.
Launch (any config file works the same way):

  python train.py --config=configs/shapes.py:cpu --workdir=runs/shapes_cpu \
      --config.optim.num_steps=2000
"""

import ml_collections


def get_config(arg=None):
  """Returns the base ConfigDict. `arg` is unused here (variants parse it)."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init and the per-step RNG (fold_in(seed, step)).

  # --- data ---------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'shapes'  # 'shapes', 'shapes_rendered', 'folder', 'tfds' or 'array_record' (docs/data.md).
  data.path = ''  # folder: the image tree; array_record: a glob of shards (python -m tools.prepare).
  data.eval_path = ''  # The same for a validation split ('' = none); eval prompts can come from it.
  data.tfds_name = ''  # tfds: the dataset name (e.g. 'coco_captions'), prepared in data_dir.
  data.train_split = 'train'  # tfds: the training split.
  data.eval_split = ''  # tfds: the validation split ('' = none).
  data.image_key = 'image'  # tfds: the image feature ('a/b' for a nested feature).
  data.caption_key = 'text'  # Caption field: metadata.jsonl key (folder) or tfds feature ('captions/text').
  data.image_size = 32  # Side S of the square training images, in pixels.
  data.allow_other_sample_size = False  # Let sample.py --image_size differ from image_size.
  data.crop = 'center'  # After resizing the shorter side to S: 'center' or 'random' S x S crop.
  data.flip = False  # Random horizontal flips (off for Shapes: left/right is in the captions).
  data.upscale = True  # False: images with a side below S are bad records (skipped, or an error).
  data.on_bad_record = 'skip'  # Unusable image or missing caption: 'skip' (log, count) or 'error'.
  data.num_train = 50_000  # Shapes: examples in the train split (generated once into data_dir).
  data.num_test = 1_000  # Shapes: examples in the test split.
  data.data_dir = ''  # TFDS data_dir; '' = the TFDS default (~/tensorflow_datasets).
  data.seed = 0  # Shuffle seed: the batch at step s is a pure function of (seed, s).
  data.global_batch_size = 64  # Examples per step over all processes.
  data.buckets = ()  # Aspect-ratio buckets, ((height, width), ...) of sides the network takes, e.g.
  # ((64, 64), (48, 80), (80, 48)): each image trains at the one nearest its shape (docs/data.md).
  data.bucket_max_aspect = 0.0  # > 1 with data.buckets=(): generate buckets of about image_size^2
  # pixels with aspect ratios up to this (e.g. 2.0); 0 and no data.buckets = square images only.
  data.bucket_max_gib = 0.0  # > 0: refuse, before step 0, a bucket whose train step needs more
  # than this many GiB a device by XLA's memory analysis (0: not checked).
  data.num_workers = 0  # grain worker processes decoding batches (0 = threads of this process).
  data.prefetch = 2  # Batches prepared ahead (per worker with num_workers > 0); 0 = on demand.

  # --- text encoder ---------------------------------------------------------
  config.text = text = ml_collections.ConfigDict()
  text.encoder = 'scratch'  # 'scratch' (trained jointly) or 'pretrained' (frozen BERT/T5 folder).
  text.max_len = 16  # Tokens per caption, [BOS] included; longer captions are truncated.
  text.vocab = 'shapes'  # Scratch tokenizer: 'shapes', a word-per-line file, 'bpe' or a tokenizer.json (README).
  text.vocab_size = 8192  # Subword vocabulary size when text.vocab='bpe' trains one.
  text.width = 128  # Scratch encoder width (token embedding size).
  text.depth = 2  # Scratch encoder transformer blocks.
  text.num_heads = 4  # Scratch encoder attention heads.
  text.dtype = 'float32'  # Compute dtype of the encoder ('float32' or 'bfloat16').
  text.param_dtype = 'float32'  # Parameter dtype of the scratch encoder.
  text.pretrained_path = ''  # Pretrained: local HF folder or hub name; '' = packaged all-MiniLM-L6-v2.
  text.allow_download = True  # A pretrained_path 'org/name' that is no local folder: fetch it from the hub.
  text.cache_embeddings = False  # Pretrained: precompute caption embeddings once (finite datasets).
  text.cond_drop_prob = 0.1  # Probability of replacing a caption by the empty one (CFG training).
  text.finetune = False  # Pretrained: train the encoder's weights with the denoiser (same optimiser,
  # EMA and checkpoints) instead of keeping them frozen; needs text.cache_embeddings=False.
  text.clip_skip = 0  # CLIP: condition on the output this many layers before the last (then its
  # final layer norm), as diffusers' and kohya's clip_skip; 0 = the last layer.

  # --- model (U-Net) --------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.family = 'unet'  # The denoiser network (models/family.py): 'unet', the ADM-style U-Net;
  # 'sd', Stable Diffusion's U-Net from model.pretrained.
  model.pretrained = ''  # A diffusers Stable Diffusion folder: fills the U-Net, text encoder, VAE
  # and diffusion fields from it (configs/pipeline.py, docs/stable_diffusion.md).
  model.pretrained_changes = ()  # Fields that may differ from model.pretrained's on purpose, e.g.
  # ('diffusion.zero_terminal_snr', 'diffusion.prediction').
  model.patch_size = 1  # Fold p x p pixel patches into channels first (p=2: 4x cheaper convs).
  model.coord_channels = True  # Append (x, y) coordinate channels: absolute position for "left of".
  model.pooled_conditioning = False  # Add the pooled text vector to the noise embedding (Imagen);
  # off by default: its spatially uniform signal mixed the colours of two-object prompts (BENCHMARKS.md).
  model.channels = 64  # Base channel width.
  model.channel_mult = (1, 2, 2)  # Width multiplier per resolution level.
  model.num_res_blocks = 2  # Residual blocks per level.
  model.attn_resolutions = (16, 8)  # Spatial sizes with self- and cross-attention.
  model.num_heads = 4  # Attention heads.
  model.head_dim = 0  # Channels per attention head; 0 = attention width / num_heads.
  model.dropout = 0.0  # Dropout rate inside residual blocks.
  model.norm_groups = 32  # GroupNorm groups (clamped to a divisor of the channel count).
  model.dtype = 'float32'  # Compute dtype ('bfloat16' on accelerators).
  model.param_dtype = 'float32'  # Parameter dtype.
  model.remat = 'none'  # Recompute blocks in the backward pass: 'none', 'dots' or 'full' (less
  # memory, more compute; docs/models.md). 'dots' keeps matmul outputs; True/False = 'full'/'none'.
  model.attention = 'auto'  # Self-attention kernel: 'auto' (cuDNN flash attention for bf16/fp16 on a
  # GPU, else XLA), 'xla' or 'cudnn' (models/attention.py).
  model.lora = lora = ml_collections.ConfigDict()  # model.family='sd': LoRA (docs/stable_diffusion.md).
  lora.rank = 0  # Rank of the adapters; 0 = no LoRA (train every U-Net weight).
  lora.alpha = 0.0  # The adapters' update is scaled by alpha / rank; 0 = alpha = rank.
  lora.targets = ('to_q', 'to_k', 'to_v', 'to_out.0')  # diffusers' layer names: the attention
  # projections; 'ff.net.0.proj' and 'ff.net.2' add the feed-forward (models/lora.py).
  lora.dropout = 0.0  # Dropout on the adapters' input while training, as peft's lora_dropout.

  # --- autoencoder (latent diffusion, docs/latent.md) -----------------------
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.path = ''  # '' = pixel space; a diffusers AutoencoderKL folder = diffuse in its latent space.
  ae.dtype = 'float32'  # Compute dtype of the frozen autoencoder ('bfloat16' on accelerators).
  ae.decode_chunk = 8  # Latents per decoder call when sampling (the decoder is memory-hungry).
  ae.cached_latents = True  # Use posterior moments stored in the records (tools.prepare --autoencoder).

  # --- diffusion ------------------------------------------------------------
  config.diffusion = diff = ml_collections.ConfigDict()
  diff.schedule = 'cosine'  # 'linear', 'scaled_linear', 'cosine', 'sigmoid' or 'edm'.
  diff.num_train_timesteps = 1000  # T of the discrete schedules.
  diff.beta_start = 0.0001  # First beta of 'linear'/'scaled_linear'.
  diff.beta_end = 0.02  # Last beta of 'linear'/'scaled_linear'.
  diff.zero_terminal_snr = False  # Rescale so alpha_bar_T = 0 (Lin et al. 2023); use with v/x0.
  diff.logsnr_shift = 0.0  # Added to log-SNR (resolution shift, Hoogeboom et al. 2023).
  diff.sigma_min = 0.002  # EDM: smallest sigma; also the floor of 'karras'/'uniform_logsnr' grids.
  diff.sigma_max = 80.0  # EDM: largest sigma; also caps 'karras'/'uniform_logsnr' grids.
  diff.rho = 7.0  # EDM: Karras grid exponent.
  diff.sigma_data = 0.5  # EDM: data standard deviation.
  diff.p_mean = -1.2  # EDM log-normal training sigma: mean of ln sigma.
  diff.p_std = 1.2  # EDM log-normal training sigma: std of ln sigma.
  diff.noise_sampling = 'uniform'  # Training noise levels: 'uniform' (in t) or 'lognormal' (EDM).
  diff.sampling_grid = 'auto'  # 'uniform_t', 'karras', 'uniform_logsnr'; 'auto': karras for edm;
  # 'leading', 'trailing', 'linspace': diffusers' timestep_spacing (diffusion/spacings.py).
  diff.steps_offset = 0  # The 'leading' grid's timesteps + this (diffusers' steps_offset; SD: 1).
  diff.set_alpha_to_one = True  # DDIM on a diffusers grid ends at clean data; False: at alpha_bar
  # of diffusers' timestep 0 (its DDIMScheduler's set_alpha_to_one; SD's folders: False).
  diff.prediction = 'v'  # Network output: 'eps', 'x0', 'v' or 'edm'.
  diff.loss_target = 'auto'  # Loss space: 'eps', 'x0', 'v'; 'auto' = same as prediction.
  diff.loss_weighting = 'auto'  # 'none', 'min_snr', 'edm'; 'auto' = edm for edm, else none.
  diff.min_snr_gamma = 5.0  # Min-SNR-gamma clip (Hang et al. 2023).
  diff.noise_offset = 0.0  # Offset noise: + this x one normal per example and channel (0 = off;
  # 0.05-0.1 lets a fine-tune reach darker and brighter images, as diffusers and kohya offer it).

  # --- sampler (eval grids during training; sample.py defaults) -------------
  config.sampler = sampler = ml_collections.ConfigDict()
  sampler.name = 'ddim'  # 'ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m' or 'dpmpp_2m_sde'.
  sampler.num_steps = 50  # Sampler steps (network evaluations for first-order samplers).
  sampler.guidance_scale = 3.0  # CFG scale w: 1 = conditional only, 0 = unconditional.
  sampler.eta = 0.0  # DDIM eta (0 deterministic, 1 = DDPM-like); only with name 'ddim'.
  sampler.guidance_rescale = 0.0  # Guidance rescale phi (Lin et al. 2023); 0 = plain CFG.
  sampler.guidance_interval = ()  # (lo, hi): w only for log-SNR in [lo, hi] (Kynkaanniemi 2024).
  sampler.thresholding = False  # Dynamic thresholding of x0 (Imagen, Saharia et al. 2022).
  sampler.threshold_percentile = 99.5  # Its percentile; 0 clips x0 to [-1, 1] (static clipping).
  sampler.use_ema = True  # Sample with the EMA parameters.

  # --- optimiser ------------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.num_steps = 10_000  # Total training steps.
  optim.learning_rate = 1e-4  # Peak learning rate (AdamW).
  optim.warmup_steps = 500  # Linear warmup from 0 to the peak.
  optim.end_lr_factor = 0.1  # Cosine decay ends at learning_rate * end_lr_factor.
  optim.b1 = 0.9  # AdamW beta1.
  optim.b2 = 0.99  # AdamW beta2.
  optim.eps = 1e-8  # AdamW epsilon.
  optim.weight_decay = 0.0  # AdamW decoupled weight decay (not applied to norms/biases).
  optim.grad_clip = 1.0  # Global-norm gradient clipping; 0 = off.
  optim.grad_accum_steps = 1  # k > 1: each step sums gradients over k micro-batches (less memory).
  optim.ema_decay = 0.9999  # EMA of parameters kept in the train state; 0 = no EMA.
  optim.ema_warmup = True  # EMA decay min(decay, (1+step)/(10+step)) early on.

  # --- device mesh ----------------------------------------------------------
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel axis size; -1 = all remaining devices.
  mesh.fsdp = 1  # Parameter-sharding (ZeRO-3) axis size; the batch is split over it too.
  mesh.tensor = 1  # Tensor-parallel axis size (attention heads, MLP, conv output channels).
  mesh.dcn_data = 1  # Of `data`, the part across hosts (slower network); 1 = within-host only.
  mesh.dcn_fsdp = 1  # Of `fsdp`, the part across hosts.
  # Logical axis -> mesh axes. A dimension not divisible by its mesh axes stays replicated.
  mesh.logical_axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('text_embed', 'fsdp'),
      ('conv_in', 'fsdp'),
      ('conv_out', 'tensor'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv', None),
      ('vocab', None),
      ('norm', None),
      ('height', None),
      ('width', None),
      ('channels', None),
  )

  # --- multi-process set-up (cluster/distributed.py; env vars override) ----
  config.distributed = dist = ml_collections.ConfigDict()
  dist.coordinator_address = ''  # host:port of process 0; '' = detect (SLURM, TPU, JAXDIFF_*).
  dist.num_processes = 0  # 0 = detect.
  dist.process_id = -1  # -1 = detect.
  dist.heartbeat_timeout_s = 30.0  # A process silent this long is reported lost; the others exit.
  dist.initialization_timeout_s = 300  # Wait this long for all processes to join.
  dist.shutdown_timeout_s = 300  # Wait this long for all processes at exit.
  dist.watchdog = True  # Heartbeat/failure-report thread (JAXDIFF_WATCHDOG=0 turns it off).
  dist.watchdog_interval_s = 1.0  # Seconds between watchdog rounds.

  # --- checkpoints ----------------------------------------------------------
  config.checkpoint = ckpt = ml_collections.ConfigDict()
  ckpt.every_steps = 1000  # Save every N steps (and at the end).
  ckpt.keep = 3  # Keep the last K checkpoints.
  ckpt.async_save = True  # Write in the background; the loop waits only at exit.
  # Divergence guard (README "Reliability"): a state with non-finite parameters is never saved.
  ckpt.divergence_factor = 100.0  # Nor one whose loss/grad norm/param norm is over this x median; 0 = off.
  ckpt.divergence_window = 100  # Steps in that trailing median.

  # --- logging and evaluation -----------------------------------------------
  config.logging = log = ml_collections.ConfigDict()
  log.every_steps = 50  # Write train metrics every N steps.
  log.eval_every_steps = 1000  # Sample grid (+ Shapes score) every N steps; 0 = never during training.
  log.eval_at_end = True  # Also sample (and score) the eval grid when training ends.
  log.eval_prompts = 'shapes_benchmark'  # 'shapes_benchmark', 'data' (validation captions) or a file.
  log.eval_prompt_list = ()  # Prompts for the grid, e.g. ('a cat', 'a dog'); overrides eval_prompts.
  log.eval_samples_per_prompt = 1  # Samples per prompt in the eval grid.
  log.eval_max_prompts = 63  # Cap on prompts sampled at each eval.
  log.val_examples = 0  # Validation loss at each eval on this many held-out examples (0 = none):
  # the validation split (data.eval_path / eval_split), else the first ones of the training data;
  # fixed noise at val_bins fixed noise levels, EMA weights (training/validation.py).
  log.val_bins = 8  # Noise levels of the validation loss (quantiles of training's).
  log.quality_samples = 0  # Sample this many images from validation captions at each eval and
  # score them (0 = no): FID/KID/CMMD against reference_stats, CLIP score (docs/evaluation.md).
  log.quality_metrics = ('fid', 'kid', 'clip', 'cmmd')  # Of evaluation.quality.METRICS.
  log.quality_batch = 16  # Images per sampling call of the quality metrics.
  log.inception_path = ''  # The FID Inception weights (pt_inception-2015-12-05-6726825d.pth).
  log.clip_path = ''  # A Hugging Face CLIPModel folder (CLIP score, CMMD).
  log.reference_stats = ''  # python -m tools.reference's .npz of the data (FID, KID, CMMD).
  log.profile_steps = 0  # Profile this many steps after step 10 (process 0, TensorBoard); 0 = off.
  return config


def shrink_for_tests(config):
  """The `tiny` variants' sizes (16 px, a 16-channel U-Net, 4 steps): what the tests train."""
  config.data.image_size = 16
  config.data.global_batch_size = 8
  config.data.prefetch = 0
  config.text.width = 32
  config.text.depth = 1
  config.text.num_heads = 2
  config.model.channels = 16
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.num_heads = 2
  config.model.norm_groups = 4
  config.optim.num_steps = 4
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 2
  config.optim.ema_decay = 0.9
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  config.logging.every_steps = 1
  config.logging.eval_every_steps = 0
  config.logging.eval_max_prompts = 4
  config.sampler.num_steps = 3
  return config
