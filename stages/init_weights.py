"""DVC stage `init`: the baseline's starting points, one seeded random initialization of the
backbone per fine-tuning seed (so seeds vary the baseline's init too), saved like the SimCLR
weights so both fine-tuning modes start from a file."""
import torch

from stages.lib import params, prepared, tracking
from stages.lib.cli import log, run_stage
from stages.lib.io import removed_on_failure
from stages.lib.models import ResNet, save_backbones, stem_for


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared data directory (its meta.json: the image size)")
    parser.add_argument("--out", required=True, help="weights file to write (one backbone per seed)")


def run(args):
    p = params.load(args.params, "model", "finetune.seeds")
    model, seeds, read = p.model, p.finetune.seeds, p.as_dict()
    stem = stem_for(prepared.read_facts(args.data).image_size, model.standard_stem_from)
    backbones = {}
    with removed_on_failure(args.out), tracking.stage_run("init", read) as mlrun:
        for seed in seeds:
            torch.manual_seed(seed)
            backbones[seed] = ResNet(model.arch, model.width, stem)
        save_backbones(args.out, backbones, origin="random", params=read)
        mlrun.log_metrics({"backbone_parameters": sum(t.numel() for t in backbones[seeds[0]].parameters())})
    log(f"init: random {model.arch} width {model.width} ({stem} stem) weights for seeds "
        f"{', '.join(map(str, seeds))} -> {args.out}")


def main(argv=None):
    run_stage("init", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
