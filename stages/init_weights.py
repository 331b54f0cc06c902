"""DVC stage `init`: the baseline's starting points, one seeded random initialization of the
backbone per fine-tuning seed (so seeds vary the baseline's init too), saved like the SimCLR
weights so both fine-tuning modes start from a file."""
import torch

from stages.lib import params, tracking
from stages.lib.cli import log, run_stage
from stages.lib.io import removed_on_failure
from stages.lib.models import ResNet, save_backbones


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="weights file to write (one backbone per seed)")


def run(args):
    p = params.load(args.params, "model", "finetune")
    arch, width, seeds = p["model"]["arch"], p["model"]["width"], p["finetune"]["seeds"]
    backbones, read = {}, {"model": p["model"], "finetune": {"seeds": seeds}}  # the params dvc.yaml names
    with removed_on_failure(args.out), tracking.stage_run("init", read) as run:
        for seed in seeds:
            torch.manual_seed(seed)
            backbones[seed] = ResNet(arch, width)
        save_backbones(args.out, backbones, origin="random", params={"model": p["model"], "seeds": seeds})
        run.log_metrics({"backbone_parameters": sum(t.numel() for t in backbones[seeds[0]].parameters())})
    log(f"init: random {arch} width {width} weights for seeds {', '.join(map(str, seeds))} -> {args.out}")


def main(argv=None):
    run_stage("init", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
