"""Training machinery shared by pretraining and fine-tuning: device, seeding, schedule,
optimizers, checkpoints, signals, and the epoch/step loop with NaN checks and progress."""
import hashlib
import json
import math
import signal
import time
from abc import ABC, abstractmethod

import torch

from stages.lib import distributed
from stages.lib.cli import StageError, UserError, log
from stages.lib.io import load_torch, remove, save_torch
from stages.lib.progress import Progress


def pick_device():
    """This process's device: a GPU when there is one (under torchrun, the rank's own), else the CPU."""
    return distributed.setup("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def setup(seed, device):
    """Seed torch and choose fast, reproducible kernels for the device."""
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)


def images_to_device(x, device):
    """uint8 (N, H, W, 3) numpy -> uint8 (N, 3, H, W) tensor kept on the device."""
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)


def prepare_model(model, device, compile_model, sync_batchnorm):
    """Move model to the device (channels-last on CUDA) and return the module to train with:
    wrapped in DistributedDataParallel under torchrun, compiled when asked."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = distributed.wrap(model, device, sync_batchnorm)
    return torch.compile(model) if compile_model else model


def autocast(device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def infer(model, images, standardize, batch_size=1024):
    """Outputs of `model` in eval mode, float32 (N, ...), for uint8 images (N, 3, H, W) on its device,
    standardized by `standardize` (augment.Standardize), `batch_size` at a time (a memory bound, not a
    setting: results do not depend on it)."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = channels_last(standardize.images(images[start : start + batch_size]))
        with autocast(images.device):
            outputs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outputs)


def lr_at(step, total_steps, warmup_steps, peak):
    """Linear warm-up from 0 to `peak` over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Groups with `lars=False` (BatchNorm and bias parameters) get plain SGD with momentum.
    """

    def __init__(self, groups, lr, momentum, trust=0.001):
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": 0.0, "lars": True, "trust": trust})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((p_norm > 0) & (u_norm > 0), group["trust"] * p_norm / u_norm, 1.0)
                    update = update * ratio
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buffer = state["momentum"]
                buffer.mul_(group["momentum"]).add_(update)
                p.add_(buffer, alpha=-group["lr"])


def param_groups(module, weight_decay, lr_scale=1.0, part="all"):
    """Optimizer groups of `module`'s trainable parameters: weight decay on weights (ndim > 1) only,
    none on BatchNorm and bias parameters; each group's learning rate is lr_scale x the schedule's
    (`set_lr`), and `part` names the module the group belongs to."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale, "lars": True, "part": part},
            {"params": plain, "weight_decay": 0.0, "lr_scale": lr_scale, "lars": False, "part": part}]


def make_optimizer(name, groups, lr, momentum):
    """SGD (Nesterov) or LARS over `groups` from `param_groups` (LARS adapts only the weight groups)."""
    groups = [g for g in groups if g["params"]]
    if name == "lars":
        return LARS(groups, lr, momentum)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


def optimize(optimizer, loss):
    """One optimizer step on `loss`; returns the loss, detached (it stays on the device: no sync)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def synchronize(device):
    """Wait until the device has finished its queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_since(start, device):
    """Wall-clock seconds since `start` (perf_counter), once the device has finished its work."""
    synchronize(device)
    return time.perf_counter() - start


def set_lr(optimizer, lr):
    """The schedule's learning rate `lr`, times each group's lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class Task(ABC):
    """What `run_epochs` drives: pretraining and fine-tuning, with a checkpointable state.

    Subclasses call `Task.__init__` (the batch, the warm-up + cosine schedule, the seed and the device), set
    model and optimizer, name in `kept` the attributes that a checkpoint must carry besides those, and supply
    an epoch's batch order (`batch_order`), what else starts an epoch (`start_epoch`), one training step on
    this rank's batch (`train_step`) and the epoch's end (`finish_epoch`). `step` and `end_epoch` do the
    bookkeeping they share: the epoch's order and clock, started lazily by the epoch's first step here (so a
    direct `task.step(0, i)`, as in stages/bench.py, works too) or by `restore` for a resume inside an epoch, the
    learning rate of each step, the rank's share of its batch, and the training seconds (`train_seconds`).
    """

    kept = ("history", "train_seconds")
    device: torch.device
    images_per_step: int  # global batch: images of one step over all processes
    steps_per_epoch: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, batch_size: int, batch_param: str, steps_per_epoch: int, epochs: int, warmup_epochs: int,
                 peak_lr: float, seed: int, device: torch.device):
        """`batch_size` is the global batch (split evenly over the processes; `batch_param` names it in
        params.yaml for the message when it does not split); the schedule warms up over `warmup_epochs`
        to `peak_lr` and decays to 0 at `epochs`; `seed` seeds this rank's random stream (`generator`)."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch = {steps_per_epoch}: a task needs at least one step an epoch")
        self.images_per_step = batch_size
        self.local = distributed.per_rank_batch(batch_size, batch_param)  # this rank's images of a step
        self.steps_per_epoch = steps_per_epoch
        self.total_steps, self.warmup_steps = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
        self.peak_lr, self.seed, self.device = peak_lr, seed, device
        self.generator = rank_generator(seed, device)  # each rank draws its own augmentations
        self.history, self.train_seconds = [], 0.0
        self.order, self.order_epoch, self.epoch_start = None, None, 0.0  # order_epoch: the epoch begun

    @abstractmethod
    def batch_order(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s indices, step after step (each step takes its global batch of them in turn)."""

    def start_epoch(self, epoch: int, fresh: bool) -> None:
        """Anything else an epoch's start sets; `fresh` is False when a resume starts it after its first step."""

    @abstractmethod
    def train_step(self, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """One training step on this rank's batch `index` (`local` indices from `self.order`), at the learning
        rate `step` has set; its loss, left on the device (no host sync)."""

    @abstractmethod
    def finish_epoch(self, epoch: int, mean_loss: float, seconds: float) -> dict | None:
        """The epoch's end, `seconds` of training: {name: value} for the epoch's log line, or None."""

    def step(self, epoch, step):
        """One training step (`train_step`), after starting the epoch if this is its first step here
        (`start_epoch` runs before the step's learning rate is set: it may change the groups' lr_scale)."""
        if self.order_epoch != epoch:
            self._begin_epoch(epoch, fresh=step == 0)
        set_lr(self.optimizer, lr_at(epoch * self.steps_per_epoch + step, self.total_steps, self.warmup_steps,
                                     self.peak_lr))
        return self.train_step(epoch, rank_batch(self.order, step, self.images_per_step, self.local))

    def end_epoch(self, epoch, mean_loss):
        """After the epoch's last step: adds its training seconds and returns `finish_epoch`'s fields."""
        seconds = seconds_since(self.epoch_start, self.device)
        self.train_seconds += seconds
        return self.finish_epoch(epoch, mean_loss, seconds)

    def _begin_epoch(self, epoch, fresh):
        self.order, self.order_epoch = self.batch_order(epoch), epoch
        self.start_epoch(epoch, fresh)
        self.epoch_start = time.perf_counter()

    def restore(self, state):
        """Load a checkpoint's `state`; returns its (epoch, step, loss_sum). A resume inside an epoch (step > 0,
        up to a stop on its last step) begins that epoch here, not fresh, its clock counting the seconds it ran."""
        for key in self.kept:
            setattr(self, key, state[key])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generators"][distributed.rank()])
        if state["step"]:
            self._begin_epoch(state["epoch"], fresh=False)
            self.epoch_start -= state["epoch_seconds"]
        return state["epoch"], state["step"], state["loss_sum"]

    def state(self, epoch, step, loss_sum):
        """Everything a resume at (epoch, step) needs, with the seconds that epoch has trained so far
        (a step > 0 is a stop inside the epoch in progress: `run_epochs` asks right after its step)."""
        elapsed = seconds_since(self.epoch_start, self.device) if step else 0.0
        return {"epoch": epoch, "step": step, "loss_sum": loss_sum, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch_seconds": elapsed,
                "generators": distributed.gather_objects(self.generator.get_state()),
                **{key: getattr(self, key) for key in self.kept}}


def rank_generator(seed, device):
    """This rank's random stream on the device; rank 0 (and a single process) uses `seed` itself."""
    return torch.Generator(device=device).manual_seed(seed + 1_000_003 * distributed.rank())


def rank_batch(order, step, batch, local):
    """This rank's `local` indices of step `step`'s global batch of `batch` indices in `order`."""
    first = step * batch + distributed.rank() * local
    return order[first : first + local]


def channels_last(x):
    """The memory layout the convolutions run fastest in on CUDA; unchanged elsewhere."""
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def epoch_order(n, seed, epoch, device):
    """A permutation of range(n) that depends only on (seed, epoch), so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).to(device)


def fingerprint(config):
    """Short hash of a JSON-able config: a checkpoint is only resumed by the same config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpoint:
    """A resumable training state at `path`, tied to a config fingerprint."""

    def __init__(self, path, config):
        self.path, self.fingerprint = path, fingerprint(config)

    def load(self):
        if not self.path.exists():
            return None
        state = load_torch(self.path, "checkpoint")
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"checkpoint {self.path} was written with other params or data; it is not resumed "
                f"(delete it to start over, or restore the params it was made with)"
            )
        log(f"resuming from {self.path} (epoch {state['epoch'] + 1}, step {state['step']})")
        return state

    def save(self, state):
        if distributed.is_main():
            save_torch(self.path, {**state, "fingerprint": self.fingerprint})

    def delete(self):
        if distributed.is_main():
            remove(self.path)


class StopSignal:
    """Turns the first SIGINT/SIGTERM into a flag that the loop checks between steps.

    A second signal stops at once, unless it comes within `grace_s` of the first: one Ctrl-C
    can reach a worker twice (from the terminal and from a launcher that forwards it, where the
    workers share the terminal's process group; torchrun's sit in sessions of their own and get
    only its forward), and that must still end with a checkpoint.
    """

    grace_s = 2.0

    def __init__(self):
        self.requested, self.name, self._previous, self._first = False, None, {}, 0.0

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first > self.grace_s:  # a second, deliberate signal
                raise KeyboardInterrupt(signal.Signals(signum).name)
            return
        self.requested, self.name, self._first = True, signal.Signals(signum).name, time.monotonic()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def run_epochs(task, epochs, checkpoint, checkpoint_seconds, label, checks_per_epoch=4):
    """Drive `task` through epochs of its `steps_per_epoch` steps with checkpoints, NaN checks, signals and
    progress.

    `task` is a `Task` (or has its attributes and methods: device, images_per_step, steps_per_epoch, step,
    end_epoch, restore, state). The host reads the device only about `checks_per_epoch` times an epoch (every
    steps_per_epoch // checks_per_epoch steps, and at the last: the NaN check, and the running loss when the
    progress bar is shown), so the GPU is never kept waiting between steps. A checkpoint is written at
    the end of an epoch once `checkpoint_seconds` have passed since the last one (or since this call began) on any
    rank (0: after every epoch but the last), so its cost stays small. Under torchrun, every rank checks for a
    signal at the same steps, so all stop together.
    """
    state, steps_per_epoch = checkpoint.load(), task.steps_per_epoch
    epoch, start_step, loss_sum = task.restore(state) if state else (0, 0, None)
    single, check_every = distributed.world() == 1, max(1, steps_per_epoch // checks_per_epoch)
    last_save = time.monotonic()
    with StopSignal() as stop:
        while epoch < epochs:
            progress = Progress(f"{label} epoch {epoch + 1}/{epochs}", steps_per_epoch * task.images_per_step, "img",
                                initial=start_step * task.images_per_step, quiet=not distributed.is_main())
            losses = torch.zeros(steps_per_epoch, device=task.device)
            for step in range(start_step, steps_per_epoch):
                losses[step] = task.step(epoch, step)
                if (step + 1) % check_every and step + 1 < steps_per_epoch and not (single and stop.requested):
                    continue
                _check_finite(losses, start_step, step, epoch, checkpoint)
                if step + 1 < steps_per_epoch and progress.visible:  # the last count comes with the log line, below
                    progress.update((step + 1) * task.images_per_step, loss=losses[start_step : step + 1].mean().item())
                if distributed.any_rank(stop.requested, task.device):
                    checkpoint.save(task.state(epoch, step + 1, _total(loss_sum, losses, start_step, step)))
                    raise StageError(f"{label} stopped by {stop.name or 'a signal to another process'} at epoch "
                                     f"{epoch + 1}, step {step + 1}; checkpoint saved to {checkpoint.path}; "
                                     "run again to resume")
            mean_loss = _total(loss_sum, losses, start_step, steps_per_epoch - 1).item() / steps_per_epoch
            fields = task.end_epoch(epoch, mean_loss) or {}
            progress.update(steps_per_epoch * task.images_per_step, loss=mean_loss, **fields)  # one line an epoch
            epoch, start_step, loss_sum = epoch + 1, 0, None
            # Every rank must agree (task.state gathers from all), and their clocks differ: rank 0 alone runs the
            # kNN monitor, so a checkpoint is due when it is due on any rank.
            if epoch < epochs and distributed.any_rank(time.monotonic() - last_save >= checkpoint_seconds,
                                                       task.device):
                checkpoint.save(task.state(epoch, 0, None))
                last_save = time.monotonic()


def _total(loss_sum, losses, first, last):
    """Sum of this epoch's step losses so far (including those before a resume)."""
    partial = losses[first : last + 1].sum()
    return partial if loss_sum is None else loss_sum.to(partial.device) + partial


def _check_finite(losses, first, last, epoch, checkpoint):
    window = losses[first : last + 1]
    bad = (~torch.isfinite(window)).nonzero()
    if len(bad):
        step = first + int(bad[0]) + 1
        kept = f"the last good checkpoint is {checkpoint.path}" if checkpoint.path.exists() else "no checkpoint yet"
        raise StageError(f"loss is {window[int(bad[0])].item()} at epoch {epoch + 1}, step {step}; stopping ({kept}); "
                         "try a lower learning rate")
