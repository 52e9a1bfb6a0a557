"""Time full C-DSVAE training steps (forward, backward, Adam) and print one JSON line.

    python bench.py [--batch_size 32] [--amp] [--device auto] [--nf 64] [--steps 5] [--paper_step]

Reports sequences/s, ms/step, peak RSS, and the measured bf16 (fp32 without --amp) matmul peak of this
machine in the same run, with the share of it the training step reaches (FLOPs counted for the convs).
--paper_step also times, in the same run and at the same sizes, the step as the paper repo's code makes it: fp32,
the paper's network, the video and both augmented views each through the whole model (encoded, prior, decoded),
memory in PyTorch's default layout; and prints our speed-up over it.
"""
import argparse
import json
import platform
import resource
import time

import torch

from dataloader import content_augment
from model import CDSVAE, cdsvae_loss
from utils import amp_dtype, pick_device


def conv_flops_per_video(model, frames):
    """Multiply-adds x 2 of every conv / transposed conv for one video: encoder x 2 passes (x and the motion
    view; the content view reuses x's features), decoder x 1; backward counted as 2x forward."""
    flops = {"enc": 0, "dec": 0}
    hooks = []
    for part, module in (("enc", model.encoder), ("dec", model.decoder)):
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                def hook(mod, inp, out, part=part):  # a batch of one frame
                    if isinstance(mod, torch.nn.Conv2d):  # each output element: in_ch x kh x kw multiply-adds
                        flops[part] += 2 * out[0].numel() * mod.weight[0].numel()
                    else:  # transposed: each input element is spread over out_ch x kh x kw outputs
                        flops[part] += 2 * inp[0][0].numel() * mod.weight[0].numel()
                hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()
        g = model.encoder(torch.zeros(1, 1, 3, 64, 64))
        model.decode(torch.zeros(1, 1, model.z_dim), torch.zeros(1, model.f_dim))
        model.train()
    for h in hooks:
        h.remove()
    return 3 * frames * (2 * flops["enc"] + flops["dec"])


def matmul_peak(device, dtype, n=2048, reps=10):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def seconds_per_step(step, steps, device):
    """The mean time of `steps` calls of step(), after 2 warm-up calls."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def paper_step(nf, x, m_aug, order, device):
    """A training step as the paper repo's train(): fp32, model(x), model(c_aug) and model(m_aug) each a whole
    forward pass (the views decoded too, though no loss reads them), then the loss, backward and Adam."""
    torch.manual_seed(0)
    model = CDSVAE(nf=nf, f_head_leaky=True, deconv_normal=False).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    c_aug = content_augment(x, order=order)

    def step():
        out, c_out, m_out = model(x), model(c_aug), model(m_aug)
        loss, _ = cdsvae_loss({**out, "c_post": c_out, "m_post": m_out}, x, 9000)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=32, help="videos per step (default 32)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps (default 5)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CPU) / bf16 or fp16 (CUDA)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--nf", type=int, default=64, help="conv width (default 64, the paper's)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's choice)")
    p.add_argument("--paper_step", action="store_true",
                   help="also time the paper repo's step (fp32, all three views encoded and decoded) in the same run "
                        "and print the ratio (default off)")
    args = p.parse_args(argv)
    if args.batch_size < 2 or args.steps < 1 or args.nf < 1:
        p.error("--batch_size must be at least 2, and --steps and --nf positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = CDSVAE(nf=args.nf).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    B, T = args.batch_size, model.frames
    x = torch.rand(B, T, 3, 64, 64, device=device)
    m_aug = x.flip(-1)
    order = torch.argsort(torch.rand(B, T), dim=1).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype(device) == torch.float16)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=args.amp):
            out = model(x, m_aug=m_aug, c_aug_order=order)
        loss, _ = cdsvae_loss(out, x, 9000)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    sec = seconds_per_step(step, args.steps, device)
    paper = {}
    if args.paper_step:
        paper_sec = seconds_per_step(paper_step(args.nf, x, m_aug, order, device), args.steps, device)
        paper = {"paper_sequences_per_s": round(B / paper_sec, 2), "paper_ms_per_step": round(1000 * paper_sec, 1),
                 "speedup_over_paper_step": round(paper_sec / sec, 2)}
    peak = matmul_peak(device, torch.bfloat16 if args.amp else torch.float32)
    achieved = conv_flops_per_video(model, T) * B / sec
    result = {
        "device": str(device), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "amp": args.amp, "nf": args.nf, "batch_size": B, "sequences_per_s": round(B / sec, 2),
        "ms_per_step": round(1000 * sec, 1), "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "matmul_peak_gflops": round(peak / 1e9, 1), "conv_gflops_achieved": round(achieved / 1e9, 1),
        "share_of_matmul_peak": round(achieved / peak, 3),
        "cuda_peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None,
        **paper}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
