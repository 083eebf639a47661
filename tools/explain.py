"""Heat-maps of both arms: where a fine-tuned CNN and ViT look when they classify an image (the `grad-cam` package).

    python tools/explain.py --ckpt runs/brain-cnn-10 --ckpt runs/brain-vit-10 --images new_scans/ --out heatmaps/
    python tools/explain.py --ckpt runs/brain-cnn-10/best.pt --images a.jpg b.jpg --out heatmaps/ --target glioma

For each image one PNG: the image as the models saw it (resized to the run's image size), then each model's
Grad-CAM overlaid on it, titled with its predicted class and probability (and the class the map explains, if
--target names another). The CNN's map is Grad-CAM on its last feature stage (timm's feature_info); the ViT's is
Grad-CAM on the last block's patch tokens reshaped to the patch grid (the class and register tokens left out),
the variant the grad-cam package documents for vision transformers. The paper argues (brain MRI discussion) that
the CNN attends to the centre of the image and the transformer more globally: this is how to look at that on
your own images. Needs tools/requirements.txt.
"""
import io
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cass  # noqa: E402


def target_layer(model):
    """The layer whose activations Grad-CAM weighs: a ViT's last block, a CNN's last feature stage."""
    if cass.is_vit(model.default_cfg["architecture"]):
        return model.blocks[-1].norm1
    return model.get_submodule(model.feature_info[-1]["module"])


def tokens_to_grid(model):
    """[B, prefix + h*w, C] tokens -> [B, C, h, w], for Grad-CAM on a ViT (None for a CNN)."""
    if not cass.is_vit(model.default_cfg["architecture"]):
        return None
    h, w = model.patch_embed.grid_size

    def reshape(tokens):
        return tokens[:, model.num_prefix_tokens:].reshape(len(tokens), h, w, -1).permute(0, 3, 1, 2)
    return reshape


def heatmaps(model, x, target=None):
    """Grad-CAM of a fine-tuned timm model on normalised images [B, 3, S, S]: maps [B, S, S] in [0, 1], the
    probabilities [B, C] and the class each map explains (`target`, or the predicted class)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), dim=1)
    classes = [target if target is not None else int(p.argmax()) for p in probs]
    with GradCAM(model=model, target_layers=[target_layer(model)], reshape_transform=tokens_to_grid(model)) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    return maps, probs, classes


def image_table(source, classes):
    """The images to explain: a folder (searched recursively), a CSV with an `image` column, or one image file."""
    source = Path(source)
    if source.is_dir():
        keys = [str(p.relative_to(source)) for p in cass.image_files(source)]  # cass.py's folder rule
        table = cass.Table("explain", classes, False, {}, keys, image_dir=str(source))
    elif source.suffix.lower() in cass.IMAGE_SUFFIXES and source.is_file():
        table = cass.Table("explain", classes, False, {}, [source.name], image_dir=str(source.parent))
    elif source.is_file():
        table = cass.table_csv(source, "explain")
    else:
        raise cass.UserError(f"--images {source} is neither a folder of images, an image nor a CSV file")
    if not table.keys:
        raise cass.UserError(f"--images {source} holds no images ({', '.join(sorted(cass.IMAGE_SUFFIXES))})")
    return table


def png_names(keys):
    """One PNG name per image, its path with / as __: scans/a.jpg -> scans__a.png, or scans__a.jpg.png where two
    images would share a name (a.jpg and a.png); images of two sources at one path are refused."""
    full = [key.replace("/", "__").replace("\\", "__") for key in keys]
    stems = [name.rsplit(".", 1)[0] for name in full]
    stem_count = Counter(stems)
    names = [f"{s if stem_count[s] == 1 else f}.png" for s, f in zip(stems, full)]
    name_count = Counter(names)
    twice = next((k for k, n in zip(keys, names) if name_count[n] > 1), None)
    if twice:
        raise cass.UserError(f"two of the --images are both {twice}: their heat-maps would share one name; explain "
                             "them in two runs (two --out folders)")
    return names


def explain(ckpts, images, out, target=None):
    """One PNG per image of the sources `images` in `out`: the image and each model's heat-map. Returns the files
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam.utils.image import show_cam_on_image

    loaded = [cass.load_finetuned(p) for p in ckpts]
    classes = list(loaded[0][1]["classes"])
    if any(list(obj["classes"]) != classes for _, obj in loaded) or any(obj["multilabel"] for _, obj in loaded):
        raise cass.UserError("the --ckpt files must be single-label models of the same classes")
    if target is not None and target not in classes:
        raise cass.UserError(f"--target {target} is not one of the classes {', '.join(classes)}")
    models = [(path, obj, cass.load_encoder(obj, path).eval()) for path, obj in loaded]
    tables = [image_table(source, classes) for source in images]
    out, items = Path(out), [(table, key) for table in tables for key in table.keys]
    cass.check_output(out, [*images, *(path for path, _, _ in models)], folder=True)  # no input, nor inside one
    inside = next((p for p in images if out.resolve() in Path(p).resolve().parents), None)  # a PNG could replace it
    if inside:
        raise cass.UserError(f"--out {out} holds the input {inside}; give a folder outside the images")
    names = png_names([key for _, key in items])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (table, key), name in zip(items, names):
        views = [cass.decode_image(replace(table, window=obj["config"].get("window")), key, obj["img_size"])
                 for _, obj, _ in models]  # uint8 [3, S, S], as each model was trained (size, DICOM window)
        fig, axes = plt.subplots(1, 1 + len(models), figsize=(4 * (1 + len(models)), 4.4), squeeze=False)
        axes[0][0].imshow(views[0].permute(1, 2, 0).numpy())
        axes[0][0].set_title(Path(key).name, fontsize=9)
        for ax, (path, obj, model), view in zip(axes[0][1:], models, views):
            maps, probs, explained = heatmaps(model, cass.normalize(view[None]),
                                              None if target is None else classes.index(target))
            rgb = view.permute(1, 2, 0).numpy().astype(np.float32) / 255
            ax.imshow(show_cam_on_image(rgb, maps[0], use_rgb=True))
            predicted = int(probs[0].argmax())
            title = f"{obj['arm']} ({obj['model']}): {classes[predicted]} {float(probs[0, predicted]):.2f}"
            ax.set_title(title + ("" if explained[0] == predicted else f"\nmap of {classes[explained[0]]}"),
                         fontsize=9)
        for ax in axes[0]:
            ax.axis("off")
        fig.tight_layout()
        png = io.BytesIO()
        try:
            fig.savefig(png, format="png", dpi=100)
        finally:
            plt.close(fig)
        cass.atomic_write(out / name, png.getvalue())  # whole, then renamed: a kill or a full disk leaves no half PNG
        written.append(out / name)
    print(f"wrote {len(written)} heat-map PNG(s) to {out}")
    return written


def main(argv=None):
    p = cass.Parser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", required=True, help="a fine-tuned best.pt or its run folder; give two "
                   "(a CNN and a ViT) to see them side by side")
    p.add_argument("--images", required=True, nargs="+", help="folders of images (searched recursively), images, "
                   "or CSVs with an 'image' column")
    p.add_argument("--out", required=True, help="the folder for the PNGs (made if absent)")
    p.add_argument("--target", help="the class whose evidence to map (default: each model's predicted class)")
    args = p.parse_args([str(a) for a in argv] if argv is not None else None)
    return cass.run_command(lambda: explain(args.ckpt, args.images, args.out, args.target), "interrupted")


if __name__ == "__main__":
    sys.exit(main())
