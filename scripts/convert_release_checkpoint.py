"""Convert a checkpoint written by the authors' release (github:lvliang6879/ScaleMatch, its ScaleMatch.py's
latest.pth / best.pth) into a checkpoint of this codebase, so that eval.py evaluates it, --multiscale-cif included.

    python scripts/convert_release_checkpoint.py RELEASE.pth OUT.pth --config configs/pascal.yaml [key=value ...]
    python eval.py --checkpoint OUT.pth --multiscale-cif

The release's file is a dict whose 'model' is the state dict of its (DistributedDataParallel-wrapped) network, or a
bare state dict; 'module.' prefixes are removed. The config (with the overrides) must describe the release's network:
its nclass, backbone and CIF sizes; it becomes the checkpoint's config (data_root, eval_mode, ...). Every tensor
must find its place and every place must be filled; anything else stops with one line and writes nothing.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import build_model  # noqa: E402
from model.release import ReleaseStateError, convert_state_dict, release_state_dict  # noqa: E402
from util.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from util.config import ConfigError, load_config  # noqa: E402


def convert(release_path: str, out_path: str, config: str, overrides: list[str]) -> dict:
    """Write OUT as a checkpoint of ``config`` holding the release's weights; returns what was written."""
    cfg = load_config(config, overrides)
    if not cfg["cif"]:
        raise ConfigError(f"{config}: cif is false, but the release's network always has the CIF module")
    if os.path.realpath(release_path) == os.path.realpath(out_path):
        raise CheckpointError(f"{out_path}: the output would overwrite the release checkpoint; choose another path")
    checkpoint = load_checkpoint(release_path)
    release_state = release_state_dict(checkpoint, release_path)
    classes = release_state.get("classifier.weight")
    if classes is not None and classes.shape[0] != cfg["nclass"]:
        raise ReleaseStateError(f"{release_path}: the checkpoint has {classes.shape[0]} classes, the config "
                                f"{config} nclass {cfg['nclass']}")
    model = build_model(dict(cfg, pretrained=None))
    model.load_state_dict(convert_state_dict(release_state, model.state_dict(), release_path))
    epoch = checkpoint.get("epoch", 0) if isinstance(checkpoint, dict) else 0
    state = {"model": model.state_dict(), "config": cfg, "epoch": epoch,
             "release": {"source": os.path.abspath(release_path),
                         "previous_best": checkpoint.get("previous_best") if isinstance(checkpoint, dict) else None}}
    save_checkpoint(state, out_path)
    return state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release_checkpoint", help="latest.pth / best.pth written by the release's ScaleMatch.py")
    parser.add_argument("out", help="where to write the converted checkpoint")
    parser.add_argument("--config", required=True, help="config describing the release's network, e.g. "
                                                         "configs/pascal.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. nclass=19)")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options
    state = convert(args.release_checkpoint, args.out, args.config, args.overrides)
    cfg = state["config"]
    print(f"wrote {args.out}: {len(state['model'])} tensors, {cfg['dataset']} {cfg['backbone']} nclass {cfg['nclass']}, "
          f"release epoch {state['epoch']}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError, ReleaseStateError, OSError) as error:  # OSError: e.g. OUT not writable
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
