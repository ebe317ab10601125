"""Pretrain a backbone on a generated task that is not the benchmark: the CPU stand-in for ImageNet weights.

    python scripts/pretrain_backbone.py [--backbone tv_resnet18] [--out ~/.cache/scalematch/pretrained/...pth]

The task (dataset/shapes_pretrain.py) segments 25 classes of shapes and textures that the synthetic benchmark never
uses, with a DeepLabV3+ head that is then thrown away; the backbone never sees a benchmark class, image or label.
Its weights land where `pretrained:` can load them, with a JSON file beside them holding the arguments and the
held-out mIoU. The run is deterministic for a given machine and torch version; an existing file is reused
unless --force, so a study can call this first at no cost.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset import shapes_pretrain  # noqa: E402
from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from model.backbone import BACKBONES, build_backbone  # noqa: E402
from model.deeplabv3plus import DeepLabV3Plus  # noqa: E402

DEFAULT_OUT = "~/.cache/scalematch/pretrained/shapes_{backbone}.pth"


def to_tensor(images) -> torch.Tensor:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def random_crops(images: torch.Tensor, masks: torch.Tensor, crop: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One random crop and horizontal flip per sample."""
    height, width = images.shape[-2:]
    out_images, out_masks = [], []
    for image, mask in zip(images, masks):
        top = int(torch.randint(height - crop + 1, (1,), generator=generator))
        left = int(torch.randint(width - crop + 1, (1,), generator=generator))
        image, mask = image[:, top:top + crop, left:left + crop], mask[top:top + crop, left:left + crop]
        if torch.rand(1, generator=generator) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        out_images.append(image)
        out_masks.append(mask)
    return torch.stack(out_images), torch.stack(out_masks)


def held_out_miou(model: DeepLabV3Plus, images: torch.Tensor, masks: torch.Tensor) -> float:
    """mIoU (%) over the classes present, whole images."""
    model.eval()
    nclass = len(shapes_pretrain.CLASSES)
    intersection, union = torch.zeros(nclass), torch.zeros(nclass)
    with torch.no_grad():
        for start in range(0, len(images), 16):
            prediction = model(images[start:start + 16]).argmax(1)
            target = masks[start:start + 16]
            for label in range(nclass):
                intersection[label] += ((prediction == label) & (target == label)).sum()
                union[label] += ((prediction == label) | (target == label)).sum()
    model.train()
    present = union > 0
    return float(100 * (intersection[present] / union[present]).mean())


def pretrain(args) -> tuple[dict, nn.Module]:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    train_images, train_masks = shapes_pretrain.generate(args.seed, args.samples)
    # Held-out samples come from another generator seed, so they are never training images.
    held_images, held_masks = shapes_pretrain.generate(args.seed + 1, args.held_out)
    train_x, train_y = to_tensor(train_images), torch.from_numpy(train_masks).long()
    held_x, held_y = to_tensor(held_images), torch.from_numpy(held_masks).long()
    print(f"generated {args.samples} + {args.held_out} images in {time.time() - start:.0f} s", flush=True)

    model = DeepLabV3Plus(build_backbone(args.backbone), len(shapes_pretrain.CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / args.iterations) ** 0.9)
    for iteration in range(1, args.iterations + 1):
        batch = torch.randint(args.samples, (args.batch,), generator=generator)
        images, masks = random_crops(train_x[batch], train_y[batch], args.crop, generator)
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if iteration % args.report_interval == 0 or iteration == args.iterations:
            print(f"iteration {iteration}/{args.iterations}: loss {loss.item():.3f}, held-out mIoU "
                  f"{held_out_miou(model, held_x, held_y):.1f} % ({(time.time() - start) / 60:.1f} min)", flush=True)
    record = {"task": "dataset/shapes_pretrain.py", "backbone": args.backbone, "seed": args.seed,
              "samples": args.samples, "held_out": args.held_out, "iterations": args.iterations, "batch": args.batch,
              "crop": args.crop, "lr": args.lr, "torch": torch.__version__,
              "held_out_miou": round(held_out_miou(model, held_x, held_y), 2),
              "minutes": round((time.time() - start) / 60, 1)}
    return record, model.backbone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tv_resnet18", choices=list(BACKBONES))
    parser.add_argument("--out", help=f"weights file (default {DEFAULT_OUT})")
    parser.add_argument("--samples", type=int, default=2000, help="training images, rendered once")
    parser.add_argument("--held-out", type=int, default=100, help="images for the held-out mIoU")
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=96, help="the benchmark's crop size")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--report-interval", type=int, default=200, help="held-out mIoU every this many iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="train even if the weights file exists")
    args = parser.parse_args(argv)
    for name in ("samples", "held_out", "iterations", "batch", "crop", "report_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.crop > min(shapes_pretrain.synthetic.HEIGHT, shapes_pretrain.synthetic.WIDTH):
        parser.error(f"--crop {args.crop} is larger than the {shapes_pretrain.synthetic.HEIGHT}-pixel images")
    out = Path(os.path.expanduser(args.out or DEFAULT_OUT.format(backbone=args.backbone)))
    if out.exists() and not args.force:
        print(f"{out} exists: reused (--force retrains)")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    record, backbone = pretrain(args)
    # Written beside and renamed: an interrupted run never leaves a file that looks finished.
    partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save(backbone.state_dict(), partial)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, out)
    print(f"wrote {out} (held-out mIoU {record['held_out_miou']} % over {len(shapes_pretrain.CLASSES)} classes)")


if __name__ == "__main__":
    main()
