"""Encoders in timm's own format: a cnn.pt, vit.pt or best.pt (or a run folder) -> a folder holding
model.safetensors and config.json, the layout of the Hugging Face hub, written by timm's own save_for_hf.

    python tools/export.py runs/brain-cnn-10 --out exported/brain-cnn-10          # a fine-tuned model
    python tools/export.py runs/brain --arm vit --out exported/brain-vit          # a pretrained arm
    python -c "import timm; m = timm.create_model('local-dir:exported/brain-cnn-10', pretrained=True)"

config.json names the architecture and its arguments (a ViT's image and patch size), num_classes and, in
pretrained_cfg, the preprocessing the model was trained with: the run's image size, a bilinear resize of the
whole image (crop_pct 1.0) and ImageNet's mean and std for both arms (timm's own ViT configurations say 0.5:
not what these weights saw); for a best.pt the class names (label_names). So
`timm.data.resolve_data_config(model=m)` gives the right transform, `num_classes=0` the backbone, and the folder
serves cass.py where it takes weights (`--cnn-weights FOLDER`, `--vit-weights FOLDER`). Each export is checked:
the model timm builds from the folder must give the same outputs as the checkpoint. Needs safetensors (timm
installs it).
"""
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cass  # noqa: E402


def checkpoint_path(path, arm=None):
    """The encoder file a user means: the file itself, a fine-tuning run's best.pt, or a pretraining run's arm."""
    path = Path(path)
    if not path.exists():
        raise cass.UserError(f"{path} does not exist")
    if path.is_file():
        return path
    if (path / "best.pt").is_file():
        return path / "best.pt"
    if arm and (path / f"{arm}.pt").is_file():
        return path / f"{arm}.pt"
    raise cass.UserError(f"{path} is not a finished run: a fine-tuning run holds best.pt, a pretraining run cnn.pt and "
                         "vit.pt (add --arm cnn or --arm vit)")


def export(path, out, arm=None):
    """Write the checkpoint at `path` as a timm folder `out`; returns the largest output difference of the check."""
    from timm.models import save_for_hf

    import timm

    path, out = checkpoint_path(path, arm), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise cass.UserError(f"--out {out} exists and is not an empty folder; choose another --out")
    cass.check_output(out, [path], folder=True)  # a writable place, not inside the checkpoint's path
    obj = cass.load_checkpoint(path, "the checkpoint")
    model = cass.load_encoder(obj, path).eval()  # a UserError for a file of another format
    size = obj["kwargs"].get("img_size") or obj.get("img_size") or obj["config"]["img_size"]
    # what cass.py feeds both arms: the whole image resized to a square (timm's "squash"; no crop), ImageNet's
    # mean and std, so that timm's own eval transform of this folder gives the tensor cass.py gives
    data_config = dict(input_size=(3, size, size), interpolation="bilinear", crop_pct=1.0, crop_mode="squash",
                       mean=cass.IMAGENET_MEAN, std=cass.IMAGENET_STD)
    what = "fine-tuned" if "classes" in obj else f"pretrained, {obj.get('config', {}).get('method', 'cass')}"
    model_config = dict(pretrained_cfg=dict(  # these weights' origin, not the architecture's ImageNet release's
        tag=f"cass.py {what} {obj['arm']} arm", paper_ids="arXiv:2206.04170", paper_name="CASS: Cross Architectural "
        "Self-Supervision for Medical Image Analysis (Singh, Sizikova, Cirrone 2022)", origin_url=None, license=None,
        notes=(f"trained with cass.py, the CASS reference implementation, from {path.name}",) + ((
            "DICOM images were read with the fixed window (centre, width) "
            f"{obj['config']['window']}: feed it images windowed alike",) if obj.get("config", {}).get("window") else
            ())),
        **({"label_names": list(obj["classes"])} if "classes" in obj else {}))
    tmp = out.with_name(f".{out.name[:40]}.tmp{os.getpid()}")  # written whole, then renamed: never half a folder
    try:
        try:
            save_for_hf(model, tmp, model_config=model_config, model_args=obj["kwargs"], safe_serialization=True,
                        data_config=data_config)
        except Exception as e:  # a full disk: safetensors' SafetensorError, json's OSError
            raise cass.UserError(f"cannot write {out} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})"
                                 "; free space or choose another --out") from None
        again = timm.create_model(f"local-dir:{tmp.resolve()}", pretrained=True).eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            difference = float((model(x) - again(x)).abs().max())
        assert difference == 0.0, f"the exported model differs from {path} by {difference}"
        if out.is_dir():
            out.rmdir()  # empty: checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}/model.safetensors and config.json; timm.create_model('local-dir:{out}', pretrained=True) "
          "builds the same model (checked: identical outputs)")
    return difference


def main(argv=None):
    p = cass.Parser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a cnn.pt, vit.pt or best.pt, or a run folder (a pretraining run needs --arm)")
    p.add_argument("--arm", choices=["cnn", "vit"], help="which arm of a pretraining run folder (default: none)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    args = p.parse_args([str(a) for a in argv] if argv is not None else None)
    return cass.run_command(lambda: export(args.checkpoint, args.out, args.arm), "interrupted")


if __name__ == "__main__":
    sys.exit(main())
