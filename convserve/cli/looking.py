"""The commands that show a user what the served model does with their images: `infer` (top-k
labels, the request's metrics, feature maps saved as PNG grids) and `visualize` (each conv layer's
filters beside its feature maps, titled from the arithmetic table). Both talk to a running server;
neither needs torch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence

from .base import Command, UsageError, add_server_flags, rpc_errors
from .remote import connect, describe_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class Progress:
    """Images done out of all: a line redrawn in place on a terminal; piped (or in a container's
    log), one line per `every` images and at the end, never carriage-return frames."""

    def __init__(self, total: int, label: str = "images", stream=None, every: int = 100) -> None:
        self.total, self.label, self.every, self.done = total, label, every, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()

    def advance(self, count: int) -> None:
        before, self.done = self.done, self.done + count
        if self.tty:
            self.stream.write(f"\r{self.label} {self.done}/{self.total}")
        elif self.done // self.every > before // self.every or self.done == self.total:
            self.stream.write(f"{self.label} {self.done}/{self.total}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def image_files(paths: Sequence[str]) -> list[str]:
    """Files as given, and the PNG/JPEG files under folders (walked, sorted)."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                found.extend(os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}")
    if not found:
        raise UsageError(f"no PNG or JPEG files in {', '.join(paths)}")
    return found


def _check_image(path: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            kind = image.format
    except (UnidentifiedImageError, OSError):
        kind = None
    if kind not in ("PNG", "JPEG"):
        raise UsageError(f"{path} is not a PNG or JPEG image")


def _feature_map_names(wanted: str, description) -> list[str]:
    known = list(description.feature_maps)
    if not wanted:
        return []
    if wanted == "all":
        return known
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        listed = ", ".join(known) or "none"
        raise UsageError(f"no feature map {', '.join(map(repr, unknown))} in {description.name}; it has: {listed}")
    return names


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape)


class _Names:
    """A file-name stem per image, unique within one run (a/1.png and b/1.png: 1 and 1-2)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def stem(self, path: str) -> str:
        base = os.path.splitext(os.path.basename(path))[0]
        stem, n = base, 1
        while stem in self.used:
            n += 1
            stem = f"{base}-{n}"
        self.used.add(stem)
        return stem


def _seen_by_server(data: bytes, spec):
    """The image as the model sees it: decoded, upright, resized and converted as the server does."""
    import io

    from PIL import Image

    from convserve.contract import resize_image

    with Image.open(io.BytesIO(data)) as image:
        return resize_image(image, spec)  # uint8 (H, W, C)


def _metrics_line(metrics: dict) -> str:
    def ms(key: str) -> str:
        return f"{metrics.get(key, 0) / 1000:.2f}"

    return (
        f"batch {metrics.get('batch_size', '?')}, server {ms('server_us')} ms = queue {ms('queue_us')} + preprocess "
        f"{ms('preprocess_us')} + compute {ms('compute_us')} + postprocess {ms('postprocess_us')} ms"
        f" ({metrics.get('execution_provider', '?')})"
    )


# ---- infer -------------------------------------------------------------------------------------


def _infer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER", help="PNG/JPEG files, or folders of them")
    p.add_argument("--model", default="digits", help="served model (default: digits)")
    p.add_argument("--top-k", type=int, default=5, help="labels to show per image")
    p.add_argument("--feature-maps", default="", help="comma list of feature maps (conv1,conv2), or all")
    p.add_argument("--save-dir", default="", help="save each feature map as a PNG grid of its channels here")
    p.add_argument("--json", action="store_true", help="JSON Lines: one object per image")
    p.add_argument("--batch-size", type=int, default=8, help="images per request (at most the model's max)")
    p.add_argument("--fp16", action="store_true", help="receive feature maps as FP16 (half the bytes)")
    add_server_flags(p)


def _infer(args: argparse.Namespace) -> int:
    from convserve.contract import PreprocessSpec
    from convserve.pictures import enlarge, grid, save_png
    from convserve.proto import grpc_service_pb2 as pb

    if args.top_k < 1 or args.batch_size < 1:
        raise UsageError("--top-k and --batch-size must be at least 1")
    files = image_files(args.paths)
    for path in files:
        _check_image(path)
    with connect(args) as client:
        description = describe_model(client, args.model)
        names = _feature_map_names(args.feature_maps, description)
        spec = PreprocessSpec.from_dict(json.loads(description.preprocess_json))
        with rpc_errors():
            config = client.stub.ModelConfig(pb.ModelConfigRequest(name=args.model), timeout=10).config
        batch_size = min(args.batch_size, config.max_batch_size or args.batch_size)
        if args.save_dir:
            os.makedirs(args.save_dir, exist_ok=True)
        stems = _Names()
        progress = Progress(len(files)) if len(files) > batch_size else None
        try:
            for batch in _batches(files, batch_size):
                encoded = []  # each file read once: sent, and decoded here for the input picture
                for path in batch:
                    with open(path, "rb") as handle:
                        encoded.append(handle.read())
                with rpc_errors():
                    results = client.classify(
                        encoded, args.model, top_k=args.top_k, feature_maps=names, fp16=args.fp16, timeout=120
                    )
                for path, data, result in zip(batch, encoded, results):
                    saved = {}
                    if args.save_dir:
                        stem = stems.stem(path)
                        for name, fmap in result.feature_maps.items():
                            target = os.path.join(args.save_dir, f"{stem}_{name}_{_shape_text(fmap.shape)}.png")
                            save_png(grid(fmap)[0], target)
                            saved[name] = target
                        seen = _seen_by_server(data, spec)
                        c_h_w = (seen.shape[2], seen.shape[0], seen.shape[1])
                        saved["input"] = os.path.join(args.save_dir, f"{stem}_input_{_shape_text(c_h_w)}.png")
                        save_png(enlarge(seen), saved["input"])
                    _report(path, result, saved, args.json)
                if progress is not None:
                    progress.advance(len(batch))
        finally:
            if progress is not None:
                progress.close()
    return 0


def _report(path: str, result, saved: dict, as_json: bool) -> None:
    if as_json:
        record = {
            "image": path,
            "top_k": [{"label": p.label, "index": p.index, "probability": p.probability} for p in result.top_k],
            "metrics": result.metrics,
            "feature_map_shapes": {name: list(fmap.shape) for name, fmap in result.feature_maps.items()},
        }
        if saved:
            record["feature_maps"] = {name: p for name, p in saved.items() if name != "input"}
            record["input_image"] = saved["input"]
        print(json.dumps(record), flush=True)
        return
    lines = [path]
    width = max(len(p.label) for p in result.top_k)
    for rank, p in enumerate(result.top_k, 1):
        lines.append(f"  {rank:>2}. {p.label:<{width}}  {p.probability:8.2%}")
    for name, fmap in result.feature_maps.items():
        where = f" -> {saved[name]}" if name in saved else ""
        lines.append(f"  feature map {name} {_shape_text(fmap.shape)}{where}")
    if "input" in saved:
        lines.append(f"  input as the model saw it -> {saved['input']}")
    lines.append(f"  metrics: {_metrics_line(result.metrics)}")
    print("\n".join(lines), flush=True)


# ---- visualize ---------------------------------------------------------------------------------


def _visualize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="served model")
    p.add_argument("image", help="a PNG/JPEG file")
    p.add_argument("--save-dir", default="visualize", help="one PNG per conv layer goes here")
    add_server_flags(p)


def _visualize(args: argparse.Namespace) -> int:
    import grpc

    from convserve.pictures import filter_grid, grid, panel, save_png

    _check_image(args.image)
    with connect(args) as client:
        description = describe_model(client, args.model)
        rows = {layer.name: layer for layer in description.layers}
        filters = {}
        for name in description.feature_maps:
            try:
                filters[name] = client.filters(args.model, name)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise UsageError(f"{exc.code().name}: {exc.details()}") from None
                print(f"{name}: no filters ({exc.details()})", file=sys.stderr)
        if not filters:
            raise UsageError(f"{args.model} has no feature map made by a single convolution with its filters saved")
        with rpc_errors():
            (result,) = client.classify([args.image], args.model, top_k=1, feature_maps=list(filters), timeout=120)
    os.makedirs(args.save_dir, exist_ok=True)
    best = result.top_k[0]
    for name, (layer, weights) in filters.items():
        fmap = result.feature_maps[name]
        row = rows.get(layer)
        out, inputs, kh, kw = weights.shape
        if row is not None and row.receptive_field:
            rf = f"receptive field {row.receptive_field[0]}x{row.receptive_field[1]}, stride {row.jump[0]} input px"
        else:
            rf = "receptive field unknown"
        detail = f" ({row.detail})" if row is not None and row.detail else ""
        title = [
            f"{description.name} {name} = layer {layer}{detail}: output {_shape_text(fmap.shape)}, {rf}",
            f"{out} filters of {inputs}x{kh}x{kw}; {os.path.basename(args.image)} -> {best.label} "
            f"({best.probability:.1%})",
        ]
        kind = "RGB" if inputs == 3 else f"mean over {inputs} input channel{'s' if inputs != 1 else ''}"
        picture = panel(
            title,
            [
                (f"filters ({kind})", filter_grid(weights)[0]),
                (f"feature maps ({fmap.shape[0]} channels)", grid(fmap)[0]),
            ],
        )
        stem = os.path.splitext(os.path.basename(args.image))[0]  # a second image does not overwrite the first
        target = os.path.join(args.save_dir, f"{stem}_{description.name}_{name}_{_shape_text(fmap.shape)}.png")
        save_png(picture, target)
        print(target)
    return 0


COMMANDS = [
    Command(
        "infer",
        "classify PNG/JPEG files (or folders of them) with a running server; feature maps as PNG grids",
        _infer_args,
        _infer,
    ),
    Command(
        "visualize",
        "one picture per conv layer: its filters beside its feature maps for an image, from a running server",
        _visualize_args,
        _visualize,
    ),
]
