"""DVC stage `init`: the baseline's starting points, one seeded random initialization of the
backbone per fine-tuning seed (so seeds vary the baseline's init too), saved like the SimCLR
weights so both fine-tuning modes start from a file."""
import torch

from stages.lib import params
from stages.lib.cli import log, run_stage
from stages.lib.models import ResNet, save_backbones


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="weights file to write (one backbone per seed)")


def run(args):
    p = params.load(args.params, "model", "finetune")
    arch, width, seeds = p["model"]["arch"], p["model"]["width"], p["finetune"]["seeds"]
    backbones = {}
    for seed in seeds:
        torch.manual_seed(seed)
        backbones[seed] = ResNet(arch, width)
    save_backbones(args.out, backbones, origin="random", params={"model": p["model"], "seeds": seeds})
    log(f"init: random {arch} width {width} weights for seeds {', '.join(map(str, seeds))} -> {args.out}")


def main(argv=None):
    run_stage("init", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
