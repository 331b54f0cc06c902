"""DVC stage `data`: read the configured data set (a name such as cifar10, or a local folder or
archive), verify it, and write uint8 arrays plus meta.json, the data facts, to --out (all or nothing)."""
from pathlib import Path

from stages.lib import params, prepared, sources, tracking
from stages.lib.cli import log, run_stage
from stages.lib.io import atomic_path, removed_on_failure


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="output directory of the prepared data")
    parser.add_argument("--download-dir", required=True, help="where named data sets (cifar10, ...) download to")


def run(args):
    p = params.load(args.params, "seed", "data.source", "data.image_size", "data.test_fraction", "data.limit")
    with removed_on_failure(args.out), tracking.stage_run("data", p.as_dict()) as run:
        facts = prepare(p, args)
        counts = {f"{split}_images": n for split, n in facts.images.items()}
        run.log_metrics({**counts, "unlabeled_images": facts.unlabeled})
        run.log_artifact(Path(args.out) / "meta.json")
        run.log_dataset(tracking.dataset(facts, "prepared"))


def prepare(p, args):
    """Read, subset (data.limit), describe and write the data; return its DataFacts."""
    data = p.data
    log(f"data: reading {data.source}")
    # A relative path is taken from the repository root, also in queued experiments.
    where = data.source if data.source in sources.DATASETS else str(tracking.repo_root() / data.source)
    found = sources.read_source(where, data.image_size, data.test_fraction, p.seed, Path(args.download_dir))
    x, y = found.train
    keep = prepared.stratified_subset(y, data.limit, p.seed)
    arrays = {"train": (prepared.subset(x, keep), prepared.subset(y, keep)), "test": found.test}
    if found.unlabeled is not None:
        pick = prepared.random_subset(len(found.unlabeled), data.limit, p.seed)
        arrays["unlabeled"] = prepared.subset(found.unlabeled, pick)
    facts = prepared.data_facts(arrays, found.classes, source=data.source, url=found.url, sha256=found.sha256,
                                test_split=found.test_split, limit=data.limit)
    with atomic_path(args.out) as tmp:
        prepared.save_prepared(tmp, arrays, facts)
    log(f"data: wrote {facts.images['train']} train, {facts.images['test']} test and {facts.unlabeled} unlabeled "
        f"{facts.image_size}x{facts.image_size} images of {len(facts.classes)} classes to {args.out} "
        f"(test set: {facts.test_split})")
    return facts


def main(argv=None):
    run_stage("data", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
