"""Times the official EncDiff code's training step on this host, for a side-by-side with `encdiff-benchmark`.

  git clone https://github.com/ThomasMrY/EncDiff /tmp/EncDiff   # or any copy of its first commit
  pip install '.[official]'                                     # torch, einops, omegaconf
  python experiments/official_step.py --official_repo=/tmp/EncDiff --batch_size=32 --steps=10 --json=official.json

The official release has no working training entry point (ldm/models/diffusion/ddpm_enc.py imports
`ldm.modules.diffusionmodules.vct_encoder`, which the release lacks), so this script builds LatentDiffusion's
training step from the official modules themselves, as configs/latent-diffusion/shapes3d-vq-4-16-encdiff.yaml
configures them: the frozen VQ encoder (`ldm.modules.diffusionmodules.model.Encoder` + `quant_conv`, i.e.
`VQModelInterface.encode`) scaled by 1/std of the first batch's latents, `Encoder4` on the image, `UNetModel` under
cross-attention, the l1 ε loss of `LatentDiffusion.p_losses`, AdamW over UNet + encoder, the LambdaLR warm-up of
`LambdaLinearScheduler`, and `LitEma` over the UNet after each step. PyTorch Lightning's own per-step bookkeeping
(logging, callbacks) is left out, so the official trainer can only be slower than this.

Two times are reported per step: `step_ms` (all of the above: what `encdiff-benchmark`'s train step does) and
`bare_step_ms` (forward, backward and AdamW only: no VQ encode, EMA or LR schedule; the encoder input and latents
are precomputed). Weights are the modules' random initialisation and the images random: the speed does not depend
on either.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Sequence

# configs/latent-diffusion/shapes3d-vq-4-16-encdiff.yaml and configs/autoencoder/shapes3d_vq_4_16.yaml
UNET = dict(image_size=16, in_channels=3, out_channels=3, model_channels=64, attention_resolutions=[1, 2, 4],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_scale_shift_norm=True,
            resblock_updown=True, use_spatial_transformer=True, context_dim=16, latent_unit=20)
ENCODER4 = dict(d=128, context_dim=16, latent_unit=20)
VQ_DDCONFIG = dict(double_z=False, z_channels=3, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 4],
                   num_res_blocks=2, attn_resolutions=[], dropout=0.0)
VQ_EMBED_DIM = 3
BASE_LR, WARMUP_STEPS, F_START = 2.0e-6, 10_000, 1.0e-6  # base_learning_rate (x batch with --scale_lr), warm_up
LINEAR_START, LINEAR_END, TIMESTEPS = 0.0015, 0.0155, 1000
EMA_DECAY = 0.9999
IMAGE_SIZE = 64


def import_official(repo: str):
  """The official modules, imported from `repo`; one clear error when the path or a dependency is missing."""
  marker = os.path.join(repo, "ldm", "modules", "diffusionmodules", "openaimodel_enc.py")
  if not os.path.isfile(marker):
    raise SystemExit(f"error: --official_repo={repo!r} is not a copy of the official EncDiff code (no {marker}); "
                     "clone https://github.com/ThomasMrY/EncDiff and pass its path.")
  sys.path.insert(0, os.path.abspath(repo))
  try:
    modules = {name: importlib.import_module(f"ldm.{name}") for name in (
        "modules.diffusionmodules.openaimodel_enc", "modules.diffusionmodules.model", "modules.ema",
        "modules.diffusionmodules.util")}
  except ImportError as e:
    raise SystemExit(f"error: importing the official modules failed ({e}); install what they need with "
                     "`pip install '.[official]'` (torch, einops, omegaconf).") from e
  return modules


def build_step(official, batch_size: int, seed: int):
  """(step, bare_step, UNet parameters, Encoder4 parameters): the closures each run one training step of the
  official model and return its loss."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  openai = official["modules.diffusionmodules.openaimodel_enc"]
  unet = openai.UNetModel(**UNET)
  encoder = openai.Encoder4(**ENCODER4)
  vq_encoder = official["modules.diffusionmodules.model"].Encoder(**VQ_DDCONFIG)
  quant_conv = torch.nn.Conv2d(VQ_DDCONFIG["z_channels"], VQ_EMBED_DIM, 1)
  for module in (vq_encoder, quant_conv):
    module.eval().requires_grad_(False)
  ema = official["modules.ema"].LitEma(unet, decay=EMA_DECAY)

  betas = official["modules.diffusionmodules.util"].make_beta_schedule(
      "linear", TIMESTEPS, linear_start=LINEAR_START, linear_end=LINEAR_END)
  alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)
  sqrt_ac, sqrt_1m_ac = alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt()

  lr = BASE_LR * batch_size  # main.py --scale_lr: base_lr x batch (x GPUs x accumulation, 1 each here)
  optimizer = torch.optim.AdamW(list(unet.parameters()) + list(encoder.parameters()), lr=lr)
  schedule = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda n: F_START + (1.0 - F_START) * n / WARMUP_STEPS if n < WARMUP_STEPS else 1.0)

  images = torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1

  def encode_first_stage(x):
    with torch.no_grad():
      return quant_conv(vq_encoder(x))

  scale_factor = 1.0 / encode_first_stage(images).flatten().std()  # LatentDiffusion.on_train_batch_start

  def diffusion_loss(z, x):
    t = torch.randint(0, TIMESTEPS, (z.shape[0],)).long()
    noise = torch.randn_like(z)
    z_noisy = sqrt_ac[t].view(-1, 1, 1, 1) * z + sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
    context = encoder(x)  # LatentDiffusion.forward: get_learned_conditioning, cond_stage_trainable
    out = unet(z_noisy, t, context=[context])  # DiffusionWrapper, conditioning_key crossattn
    return (noise - out).abs().mean([1, 2, 3]).mean()  # loss_type l1; logvar 0, elbo weight 0

  def step():
    z = scale_factor * encode_first_stage(images)
    loss = diffusion_loss(z, images)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    ema(unet)  # on_train_batch_end
    return loss.detach().item()

  fixed_latents = scale_factor * encode_first_stage(images)

  def bare_step():
    loss = diffusion_loss(fixed_latents, images)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach().item()

  return step, bare_step, sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in encoder.parameters())


def time_step(fn, steps: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1000)
  return times


def summary(times: Sequence[float]) -> dict:
  ordered = sorted(times)
  return {"median_ms": statistics.median(ordered), "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
          "times_ms": list(times)}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--official_repo", required=True, help="a copy of github.com/ThomasMrY/EncDiff")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default="", help="also write the result here")
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
    parser.error("--batch_size and --steps must be >= 1 and --warmup >= 0")
  official = import_official(args.official_repo)
  import torch  # pylint: disable=import-outside-toplevel
  if args.threads:
    torch.set_num_threads(args.threads)
  step, bare_step, unet_params, encoder_params = build_step(official, args.batch_size, args.seed)
  result = {
      "batch_size": args.batch_size, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
      "machine": platform.processor() or platform.machine(), "unet_params": unet_params,
      "encoder_params": encoder_params, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "step": summary(time_step(step, args.steps, args.warmup)),
      "bare_step": summary(time_step(bare_step, args.steps, args.warmup)),
  }
  for name in ("step", "bare_step"):
    result[name]["images_per_s"] = args.batch_size / result[name]["median_ms"] * 1000
  print(f"official EncDiff step, batch {args.batch_size}, torch {torch.__version__} on {result['torch_threads']} "
        f"thread(s): UNet {unet_params:,} + Encoder4 {encoder_params:,} parameters")
  for name, what in (("step", "VQ encode + step + LR schedule + EMA"), ("bare_step", "forward + backward + AdamW")):
    r = result[name]
    print(f"  {name:9s} ({what}): median {r['median_ms']:,.0f} ms, p90 {r['p90_ms']:,.0f} ms, "
          f"{r['images_per_s']:.1f} img/s")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
