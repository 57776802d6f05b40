#!/usr/bin/env python3
"""PyTorch CPU reference for site-agent/examples/unet_bench.rs.

The same U-Net as fedlink's `ArchSpec::UNet` (site-agent/src/train/model.rs):
two levels of DoubleConv (3x3 conv, padding 1 -> GroupNorm(gcd(c, 8)) -> ReLU,
twice), 2x2 max-pool, a 4c bottleneck, 2x2 stride-2 transposed convs, skip
concatenation, a 1x1 head; per-pixel cross-entropy, plain SGD (no momentum).
Same tile size, batch and number of images per epoch as the Rust bench; the
data is the same nuclei image (data/nuclei_dsb2018, raw u8, tiles from the
top-left, scaled to [0, 1]). Weights are PyTorch's default initialisation
(the timing does not depend on the values). Prints one JSON object.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def groups(c, max_groups=8):
    return math.gcd(c, max_groups) or 1


class DoubleConv(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups(c_out), c_out)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))


class UNet(nn.Module):
    def __init__(self, in_channels, c, classes):
        super().__init__()
        self.enc1 = DoubleConv(in_channels, c)
        self.enc2 = DoubleConv(c, 2 * c)
        self.bottleneck = DoubleConv(2 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = DoubleConv(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = DoubleConv(2 * c, c)
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottleneck(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


def tiles(root, tile, n):
    header = json.load(open(os.path.join(root, "header.json")))
    h, w = header["height"], header["width"]
    img = np.fromfile(os.path.join(root, "image_u8.bin"), dtype=np.uint8).reshape(h, w)
    mask = np.fromfile(os.path.join(root, "mask_u8.bin"), dtype=np.uint8).reshape(h, w)
    xs, ys = [], []
    for ty in range(h // tile):
        for tx in range(w // tile):
            sl = (slice(ty * tile, (ty + 1) * tile), slice(tx * tile, (tx + 1) * tile))
            xs.append(img[sl].astype(np.float32) / 255.0)
            ys.append(mask[sl].astype(np.int64))
    idx = [i % len(xs) for i in range(n)]
    x = torch.from_numpy(np.stack([xs[i] for i in idx])[:, None])
    y = torch.from_numpy(np.stack([ys[i] for i in idx]))
    return x, y


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser()
    p.add_argument("--base-channels", type=int, default=150)
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tiles", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data", default=os.path.join(here, "../../data/nuclei_dsb2018"))
    a = p.parse_args()
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    x, y = tiles(a.data, a.tile, a.tiles)
    model = UNet(1, a.base_channels, 2)
    params = sum(t.numel() for t in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    epochs = []
    for e in range(a.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), a.batch):
            b = order[i : i + a.batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[b]), y[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        secs = time.perf_counter() - start
        epochs.append({"seconds": secs, "loss": total / len(x)})
        print(f"torch epoch {e}: {secs:.2f} s, {len(x) / secs:.2f} images/s, loss {total / len(x):.6f}",
              file=__import__("sys").stderr)
    steady = [e["seconds"] for e in epochs[1:]] or [epochs[0]["seconds"]]
    mean = sum(steady) / len(steady)
    print(json.dumps({
        "device": "cpu (torch %s)" % torch.__version__,
        "arch": {"unet_base_channels": a.base_channels, "params": params},
        "tile": [a.tile, a.tile],
        "batch": a.batch,
        "images_per_epoch": len(x),
        "epochs": epochs,
        "steady_seconds_per_epoch": mean,
        "steady_images_per_second": len(x) / mean,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
