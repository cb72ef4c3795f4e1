"""The settings of one benchmark run: a profile plus command-line overrides."""

import dataclasses
import json

from benchmarks import protocol


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run trains; stored as `run.json`."""

    profile: str
    protocol: str
    datasets: tuple
    model: str
    seeds: tuple
    losses: tuple
    schemes: tuple
    grids: dict
    epochs: int
    learning_rate: float
    drops: tuple
    drop_factor: float
    legacy_decay: float = 0.0
    val_fraction: float = protocol.VAL_FRACTION
    test_fraction: float = 1 / 7
    calibration_fraction: float = protocol.CALIBRATION_FRACTION
    augment: bool = False
    subtract_mean: bool = False
    resnet_output_l2: float = 0.0
    paper_cp_sign: bool = False
    batch_size: int = protocol.BATCH_SIZE
    full_batches: bool = False

    @property
    def tuned_losses(self):
        return tuple(loss for loss in self.losses if protocol.LOSS_SPECS[loss].param)

    def is_searched(self, loss):
        """Whether `loss`'s grid leaves a choice: one value has nothing to
        search, so it is chosen without trials."""
        return len(self.grids[loss]) > 1

    def to_dict(self):
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def departures(self):
        """Plain-language list of how this run differs from the paper."""
        return departures(self)


def from_profile(
    profile_name,
    protocol_name="paper",
    seeds=None,
    first_seed=0,
    losses=protocol.LOSSES,
    select="both",
    model=None,
    epochs=None,
    val_fraction=None,
    legacy_decay=False,
    grids=None,
    datasets=None,
):
    """Resolves a profile and the overrides given on the command line.

    Raises:
        ValueError: naming the option and the value received.
    """
    if profile_name not in protocol.PROFILES:
        raise ValueError(
            f"Unknown profile. Expected one of {sorted(protocol.PROFILES)}. "
            f"Received: --profile={profile_name!r}"
        )
    if protocol_name not in protocol.PROTOCOLS:
        raise ValueError(
            f"Unknown protocol. Expected one of {sorted(protocol.PROTOCOLS)}. "
            f"Received: --protocol={protocol_name!r}"
        )
    rules = protocol.PROTOCOLS[protocol_name]
    profile = protocol.PROFILES[profile_name]
    model = model or profile.models[0]
    if model not in profile.schedules:
        raise ValueError(
            f"Profile {profile_name!r} runs the models {list(profile.models)}. "
            f"Received: --model={model!r}"
        )
    seeds = profile.seeds if seeds is None else _positive("--seeds", seeds)
    if first_seed < 0:
        raise ValueError(
            f"`--first-seed` must be 0 or more. Received: --first-seed {first_seed}"
        )
    epochs = profile.epochs if epochs is None else _positive("--epochs", epochs)
    if val_fraction is None:
        val_fraction = rules.val_fraction
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"`--val-fraction` must be in (0, 1). Received: {val_fraction!r}"
        )
    schedule = profile.schedules[model]
    return RunConfig(
        profile=profile_name,
        protocol=protocol_name,
        datasets=_datasets(profile, datasets),
        model=model,
        seeds=tuple(range(first_seed, first_seed + seeds)),
        losses=_losses(losses),
        schemes=_schemes(select),
        grids=_grids(grids or {}),
        epochs=epochs,
        learning_rate=schedule.learning_rate,
        drops=protocol.scaled_drops(schedule, epochs, profile.epochs),
        drop_factor=schedule.factor,
        legacy_decay=protocol.LEGACY_DECAY if legacy_decay else rules.legacy_decay,
        val_fraction=float(val_fraction),
        test_fraction=profile.test_fraction,
        augment=profile.augment,
        subtract_mean=profile.subtract_mean or rules.subtract_mean,
        resnet_output_l2=rules.resnet_output_l2 if model == "resnet56v2" else 0.0,
        paper_cp_sign=rules.paper_cp_sign,
        full_batches=profile.full_batches,
    )


def from_dict(values):
    fields = {field.name for field in dataclasses.fields(RunConfig)}
    values = {key: value for key, value in values.items() if key in fields}
    values.setdefault("protocol", "paper")
    for key in ("datasets", "seeds", "losses", "schemes", "drops"):
        values[key] = tuple(values[key])
    values["grids"] = {loss: tuple(grid) for loss, grid in values["grids"].items()}
    return RunConfig(**values)


def departures(config):
    profile = protocol.PROFILES[config.profile]
    notes = []
    if not profile.paper:
        notes.append(
            "the quick profile is a small check on embedded data with a small "
            "dense net, not one of the paper's experiments"
        )
    if len(config.seeds) < profile.seeds:
        notes.append(f"{count(len(config.seeds), 'seed')} instead of {profile.seeds}")
    if config.epochs != profile.epochs:
        notes.append(
            f"{count(config.epochs, 'epoch')} instead of {profile.epochs}"
            + _moved_drops(config, profile)
        )
    if config.datasets != profile.datasets:
        notes.append(f"datasets {list(config.datasets)} only")
    for loss in config.tuned_losses:
        spec = protocol.LOSS_SPECS[loss]
        if config.grids[loss] != spec.grid:
            notes.append(
                f"{spec.label} grid {list(config.grids[loss])} instead of "
                f"{list(spec.grid)}"
            )
    if abs(config.val_fraction - protocol.VAL_FRACTION) > 1e-9:
        notes.append(
            f"search hold-out {config.val_fraction:g} of the training part "
            "instead of the paper's 1/6"
        )
    if config.legacy_decay:
        notes.append(
            f"the authors' code's learning-rate decay {config.legacy_decay:g} "
            "per step (not in the paper)"
        )
    if config.subtract_mean and not profile.subtract_mean:
        notes.append(
            "the training part's pixel mean subtracted from the inputs, as the "
            "authors' code does (the paper's text does not say so)"
        )
    if config.resnet_output_l2:
        notes.append(
            f"kernel and activity L2 of {config.resnet_output_l2:g} on ResNet's "
            "output layer, as the authors' code has"
        )
    if config.paper_cp_sign:
        notes.append(
            "the confidence penalty with the paper's sign, CE + β·H(p), which "
            "rewards confidence (Pereyra et al. subtract it)"
        )
    extra = [loss for loss in config.losses if not protocol.LOSS_SPECS[loss].paper]
    if extra:
        labels = ", ".join(protocol.LOSS_SPECS[loss].label for loss in extra)
        notes.append(f"losses the paper does not compare ({labels}), ranked apart")
    return notes


def _moved_drops(config, profile):
    if not profile.schedules[config.model].drops:
        return ""
    if not config.drops:
        return " (no learning-rate drop left)"
    return f" (learning-rate drops moved to epochs {list(config.drops)})"


def count(number, noun):
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _positive(option, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{option}` must be a positive integer. Received: {value!r}")
    return value


def _datasets(profile, datasets):
    if not datasets:
        return profile.datasets
    unknown = [name for name in datasets if name not in profile.datasets]
    if unknown:
        raise ValueError(
            f"Profile {profile.name!r} has the datasets {list(profile.datasets)}. "
            f"Received: --datasets={','.join(datasets)}"
        )
    return tuple(name for name in profile.datasets if name in datasets)


def _losses(losses):
    losses = tuple(losses)
    unknown = [loss for loss in losses if loss not in protocol.LOSS_SPECS]
    if unknown or not losses:
        raise ValueError(
            "`--losses` takes a comma-separated subset of "
            f"{list(protocol.LOSS_SPECS)}. Received: --losses={','.join(losses)}"
        )
    return tuple(loss for loss in protocol.LOSS_SPECS if loss in losses)


def _schemes(select):
    if select == "both":
        return protocol.SCHEMES
    if select not in protocol.SCHEMES:
        raise ValueError(
            f"`--select` must be 'accuracy', 'ece' or 'both'. Received: {select!r}"
        )
    return (select,)


def _grids(overrides):
    grids = {}
    for loss, spec in protocol.LOSS_SPECS.items():
        if loss in overrides:
            grids[loss] = _grid(spec, overrides[loss])
        elif spec.param:
            grids[loss] = spec.grid
    for loss in overrides:
        if loss not in grids or not protocol.LOSS_SPECS[loss].param:
            raise ValueError(
                f"`--grid` takes LOSS=v1,v2,... for a loss of "
                f"{[k for k, s in protocol.LOSS_SPECS.items() if s.param]}. "
                f"Received: --grid {loss}=..."
            )
    return grids


def _grid(spec, values):
    # The range of each value is the loss's own check (`check_grids`): Poly-1
    # takes epsilon down to -1.
    values = tuple(float(value) for value in values)
    if not values or len(set(values)) != len(values):
        raise ValueError(
            f"`--grid {spec.key}=...` needs distinct values. Received: {list(values)}"
        )
    return values
