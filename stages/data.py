"""DVC stage `data`: read CIFAR-10 from the configured source, verify it, and write
uint8 arrays plus meta.json to --out (all or nothing)."""
import hashlib
from pathlib import Path

from stages.lib import cifar, params, tracking
from stages.lib.cli import log, run_stage
from stages.lib.io import atomic_path, removed_on_failure


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="output directory of the prepared data")
    parser.add_argument("--download-dir", required=True, help="where the torchvision source downloads to")


def run(args):
    p = params.load(args.params, "seed", "data")
    with removed_on_failure(args.out), tracking.stage_run("data", p) as run:
        meta = prepare(p, args)
        run.log_metrics({f"{split}_images": sum(n.values()) for split, n in meta["counts"].items()})
        run.log_artifact(Path(args.out) / "meta.json")
        run.log_dataset(tracking.dataset(args.out, "prepared"))


def prepare(p, args):
    source, limit = p["data"]["source"], p["data"]["limit"]
    log(f"data: reading CIFAR-10 from {source}")
    # A relative path is taken from the repository root, also in queued experiments.
    where = source if source == "torchvision" else str(tracking.repo_root() / source)
    arrays, digest = cifar.read_source(where, Path(args.download_dir))
    x, y = arrays["train"]
    keep = cifar.stratified_subset(y, limit, p["seed"])
    arrays["train"] = (x[keep], y[keep])
    meta = {
        "source": source,
        "sha256": digest,
        "content_sha256": content_digest(arrays),
        "classes": list(cifar.CLASSES),
        "limit": limit,
        "counts": {split: cifar.class_counts(labels) for split, (_, labels) in arrays.items()},
        "shape": list(x.shape[1:]),
    }
    with atomic_path(args.out) as tmp:
        cifar.save_prepared(tmp, arrays, meta)
    log(f"data: wrote {len(keep)} train and {len(arrays['test'][1])} test images to {args.out}")
    return meta


def content_digest(arrays):
    """SHA-256 of the prepared arrays (train then test; images then labels): what MLflow shows as the
    data set's digest, the same for every source that yields the same pixels and labels."""
    digest = hashlib.sha256()
    for split in cifar.SPLITS:
        for array in arrays[split]:
            digest.update(array.tobytes())
    return digest.hexdigest()


def main(argv=None):
    run_stage("data", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
