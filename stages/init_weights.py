"""DVC stage `init`: the baseline's starting point, a seeded random initialization of the
backbone, saved like the SimCLR weights so both fine-tuning modes start from a file."""
import torch

from stages.lib import params
from stages.lib.cli import log, run_stage
from stages.lib.models import ResNet, save_backbone


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="weights file to write")


def run(args):
    p = params.load(args.params, "seed", "model")
    torch.manual_seed(p["seed"])
    backbone = ResNet(p["model"]["arch"], p["model"]["width"])
    save_backbone(args.out, backbone, origin="random", params=p)
    log(f"init: random {p['model']['arch']} width {p['model']['width']} weights (seed {p['seed']}) -> {args.out}")


def main(argv=None):
    run_stage("init", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
