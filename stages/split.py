"""DVC stage `split`: the validation indices and, for every fraction, the nested labeled
training indices (stratified, seeded, disjoint from validation)."""
from stages.lib import params, prepared, splits, tracking
from stages.lib.cli import log, run_stage
from stages.lib.io import atomic_path, removed_on_failure


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared data directory")
    parser.add_argument("--out", required=True, help="output directory of the index files")


def run(args):
    p = params.load(args.params, "seed", "fraction", "data")
    facts = prepared.read_facts(args.data)
    _, y = prepared.load_prepared(args.data, "train", facts)
    val, labeled = splits.make_splits(y, p.data.val_size, p.fraction, p.seed)
    data = tracking.dataset(facts, "split")
    with removed_on_failure(args.out), tracking.stage_run("split", p.as_dict(), data=data) as run:
        with atomic_path(args.out) as tmp:
            splits.save_splits(tmp, val, labeled)
        sizes = {splits.fraction_key(f): len(i) for f, i in labeled.items()}  # {fraction key: images}
        run.log_metrics({"val_images": len(val), **{f"labeled_{key}": n for key, n in sizes.items()}})
    counts = ", ".join(f"{key}: {n}" for key, n in sizes.items())
    log(f"split: validation {len(val)}, labeled {counts} -> {args.out}")


def main(argv=None):
    run_stage("split", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
