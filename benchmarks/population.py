"""Population training: many trainings of one network as one JAX program.

The trainings of a phase that share a dataset and a training-part size use
the same network, the same number of steps per epoch and the same schedule.
What differs per member is its initial weights (the seed it would have
alone), its split, its batch order, its loss and its hyper-parameter.
`PopulationTrainer` stacks the members' weights and optimizer states on a
leading axis and runs each epoch as one compiled program: `jax.lax.scan`
over the steps of `jax.vmap` over the members of Keras' stateless train step
(`Model.stateless_call`, `Optimizer.stateless_apply`). Each member computes
what `Model.fit` computes for it alone, up to the order of float additions.

On a CPU, one such program keeps only about 1.2 of 2 cores busy with the
small matrix products of these networks, so a population is cut into one
part per core, each trained by its own program in its own thread (JAX
releases the interpreter lock while a program runs).
"""

import concurrent.futures
import itertools
import os
import time

import jax
import jax.numpy as jnp
import keras
import numpy as np

from benchmarks import plan
from benchmarks import training as training_lib
from keras_label_relax._compilation import jax_jit

_EVAL_CHUNK = 1024
# Share of the free memory that one population may fill.
_MEMORY_SHARE = 0.5


class PopulationTrainer:
    """Trains groups of planned trainings as populations (JAX only).

    Args:
        config: the run's `RunConfig`.
        population_size: most members per population; `None` chooses from
            the model's size and the free memory (`default_population_size`).
    """

    name = "population"

    def __init__(self, config, population_size=None, verbose=False):
        if keras.backend.backend() != "jax":
            raise ValueError(
                "Population training needs the JAX backend. Received: "
                f"KERAS_BACKEND={keras.backend.backend()!r}"
            )
        self.config = config
        self.population_size = population_size
        self.verbose = verbose
        self._shapes = {}
        self._default_sizes = {}
        self._initial = {}

    def groups(self, trainings):
        groups = []
        for group in plan.groups_by_size(trainings):
            # Members of one loss side by side: the step computes each loss
            # on its own members' slice only.
            group = sorted(group, key=lambda training: training.loss)
            size = self.population_size or self._default_size(group[0])
            groups += [group[i : i + size] for i in range(0, len(group), size)]
        return groups

    def _default_size(self, training):
        if training.dataset not in self._default_sizes:
            model, _, _ = initial_weights(
                self._initial,
                self.config,
                training.dataset,
                self._shapes[training.dataset],
                training.seed,
            )
            self._default_sizes[training.dataset] = default_population_size(
                model, self.config
            )
        return self._default_sizes[training.dataset]

    def prepare(self, splits):
        """Remembers each dataset's example shape and classes (for the
        default population size)."""
        for split in splits.values():
            dataset = split.dataset
            self._shapes[dataset.name] = (dataset.x.shape[1:], dataset.num_classes)

    def train(self, group, splits):
        """Trains `group` as one population, in one part per CPU core at
        once; returns, per member in order, `(logits by evaluation part,
        seconds)`: its share of the wall time."""
        start = time.perf_counter()
        # Built here, one after another: the parts share the cached
        # initial models.
        parts = [
            _Population(self.config, part, splits, self._initial)
            for part in _parts(group, parallel_parts())
        ]
        with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
            logits = pool.map(self._fit_and_evaluate, parts)
            logits = [member for part in logits for member in part]
        seconds = (time.perf_counter() - start) / len(group)
        return [(member_logits, seconds) for member_logits in logits]

    def _fit_and_evaluate(self, population):
        population.fit(verbose=self.verbose)
        return population.evaluate()


def parallel_parts():
    """How many parts of a population to train at once: one per CPU core
    on a CPU, one on an accelerator (whose programs fill it already)."""
    if jax.devices()[0].platform != "cpu":
        return 1
    return len(os.sched_getaffinity(0))


def _parts(group, count):
    """`group` cut into at most `count` runs of consecutive members, of
    sizes that differ by at most one."""
    count = min(count, len(group))
    bounds = [round(i * len(group) / count) for i in range(count + 1)]
    return [group[a:b] for a, b in itertools.pairwise(bounds)]


def initial_weights(cache, config, dataset_name, shape, seed):
    """`(model, trainable values, non-trainable values)` of the model that a
    training of `dataset_name` with `seed` starts from, built once per run
    and kept in `cache`: building a model takes a fraction of a second.

    Args:
        shape: `(example shape, number of classes)`.
    """
    key = (dataset_name, seed)
    if key not in cache:
        model = training_lib.initial_model(config, *shape, seed)
        cache[key] = (
            model,
            [np.asarray(v.value) for v in model.trainable_variables],
            [np.asarray(v.value) for v in model.non_trainable_variables],
        )
    return cache[key]


def default_population_size(model, config):
    """The most members that fit in half the free memory of the device."""
    per_member = _bytes_per_member(model, config.batch_size)
    return max(1, int(_free_bytes() * _MEMORY_SHARE // per_member))


def _bytes_per_member(model, batch_size):
    parameters = sum(int(np.prod(v.shape)) for v in model.variables)
    activations = sum(
        int(np.prod(layer.output.shape[1:]))
        for layer in model.layers
        if hasattr(layer, "output")
    )
    # Weights, momentum, gradients and the updated weights; activations kept
    # for the backward pass, with room for temporaries.
    return 4 * (4 * parameters + 3 * batch_size * activations)


def _free_bytes():
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    with open("/proc/meminfo", encoding="ascii") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class _Population:
    """The stacked state and compiled steps of one population."""

    def __init__(self, config, group, splits, initial):
        self.config = config
        self.initial = initial
        self.group = group
        self.splits = [splits[(t.dataset, t.seed)] for t in group]
        dataset = self.splits[0].dataset
        self.x = _on_device(dataset.x)
        self.y = _on_device(dataset.y, "int32")
        self.train_index = np.stack(
            [
                split.parts[t.train_part]
                for t, split in zip(group, self.splits, strict=True)
            ]
        )
        self.mean = self._pixel_means(dataset)
        self.model, self.state = self._initial_state(dataset)
        self.loss_slices = _loss_slices(config, group)
        self.values = _on_device(
            [0.0 if t.value is None else t.value for t in group], "float32"
        )

    def _members(self):
        return zip(self.group, self.splits, strict=True)

    def _pixel_means(self, dataset):
        """Each member's training-part pixel mean, or zeros."""
        if not self.config.subtract_mean:
            return jnp.zeros((len(self.group), 1), "float32")
        means = [
            np.mean(dataset.x[index], axis=0, dtype=np.float64)
            for index in self.train_index
        ]
        return _on_device(np.stack(means), "float32")

    def _initial_state(self, dataset):
        """Each member's initial weights, those of its seed trained alone."""
        by_seed = {}
        for training in self.group:
            model, trainable, non_trainable = initial_weights(
                self.initial,
                self.config,
                dataset.name,
                (dataset.x.shape[1:], dataset.num_classes),
                training.seed,
            )
            by_seed[training.seed] = (trainable, non_trainable)
        self.optimizer = training_lib.make_optimizer(self.config, self.group[0].n_train)
        self.optimizer.build(model.trainable_variables)
        optimizer_values = [np.asarray(v.value) for v in self.optimizer.variables]
        members = len(self.group)

        def stack(per_member):
            return [
                _on_device(np.stack(values)) for values in zip(*per_member, strict=True)
            ]

        trainable = stack([by_seed[t.seed][0] for t in self.group])
        non_trainable = stack([by_seed[t.seed][1] for t in self.group])
        optimizer = [
            _on_device(np.broadcast_to(v, (members, *v.shape)))
            for v in optimizer_values
        ]
        return model, (trainable, non_trainable, optimizer)

    def _population_step(self, state, index, data):
        """One step of every member: each member's gradient is that of its
        own loss (the sum over members separates), its update its own."""
        trainable, non_trainable, optimizer = state
        # The dataset goes in as an argument: closed over, it would be
        # compiled into the program as a constant.
        x = jax.vmap(lambda index, mean: data[0][index] - mean)(index, self.mean)
        y = data[1][index]

        def forward(trainable, non_trainable, x):
            return self.model.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )

        def total(trainable):
            logits, new_non_trainable, penalties = jax.vmap(forward)(
                trainable, non_trainable, x
            )
            losses = jnp.concatenate(
                [
                    jax.vmap(lambda y, z, v, f=function: jnp.mean(f(y, z, v)))(
                        y[start:stop], logits[start:stop], self.values[start:stop]
                    )
                    for function, start, stop in self.loss_slices
                ]
            )
            for penalty in penalties:
                losses = losses + penalty
            return jnp.sum(losses), (losses, new_non_trainable)

        gradients, (losses, non_trainable) = jax.grad(total, has_aux=True)(trainable)
        trainable, optimizer = jax.vmap(self.optimizer.stateless_apply)(
            optimizer, gradients, trainable
        )
        return (trainable, non_trainable, optimizer), losses

    def fit(self, verbose=False):
        data = (self.x, self.y)

        def epoch(state, indices, data):
            return jax.lax.scan(
                lambda state, index: self._population_step(state, index, data),
                state,
                indices,
            )

        scan_epoch = jax.jit(epoch, donate_argnums=0)
        last_step = jax.jit(self._population_step, donate_argnums=0)
        config, group = self.config, self.group
        orders = [
            plan.batch_orders(
                t.n_train, config.batch_size, t.seed, config.epochs, config.full_batches
            )
            for t in group
        ]
        state = self.state
        for epoch in range(config.epochs):
            batches = [next(member_orders) for member_orders in orders]
            full = [
                [self.train_index[m][b] for b in member if len(b) == config.batch_size]
                for m, member in enumerate(batches)
            ]
            indices = _on_device(np.stack(full, axis=1), "int32")
            state, losses = scan_epoch(state, indices, data)
            partial = [member[-1] for member in batches]
            if len(partial[0]) != config.batch_size:
                index = np.stack(
                    [self.train_index[m][b] for m, b in enumerate(partial)]
                )
                state, _ = last_step(state, _on_device(index, "int32"), data)
            if verbose:
                print(
                    f"  population of {len(group)}: epoch {epoch + 1}/"
                    f"{config.epochs}, mean loss {float(jnp.mean(losses)):.4f}",
                    flush=True,
                )
        self.state = state

    def evaluate(self):
        """Per member, the logits on each of its evaluation parts."""
        trainable, non_trainable, _ = self.state

        def member_logits(trainable, non_trainable, index, mean, x):
            logits, _ = self.model.stateless_call(
                trainable, non_trainable, x[index] - mean, training=False
            )
            return logits

        # Evaluated once per population: on small data a fast compilation
        # saves more than the optimised program would.
        logits_of = jax_jit(jax.vmap(member_logits, in_axes=(0, 0, 0, 0, None)))
        results = [{} for _ in self.group]
        for part in self.group[0].eval_parts:
            index = np.stack([split.parts[part] for split in self.splits])
            size = index.shape[1]
            padded = -(-size // _EVAL_CHUNK) * _EVAL_CHUNK
            index = np.pad(index, ((0, 0), (0, padded - size)))
            chunks = [
                logits_of(
                    trainable,
                    non_trainable,
                    _on_device(index[:, start : start + _EVAL_CHUNK], "int32"),
                    self.mean,
                    self.x,
                )
                for start in range(0, padded, _EVAL_CHUNK)
            ]
            logits = np.concatenate([np.asarray(c) for c in chunks], axis=1)
            for member, result in enumerate(results):
                result[part] = logits[member, :size].astype(np.float32)
        return results


def _on_device(values, dtype=None):
    """`values` as a JAX array: `device_put` compiles nothing, where
    `jnp.asarray` of a numpy array compiles a copy per new shape."""
    return jax.device_put(np.asarray(values, dtype))


def _loss_slices(config, group):
    """`(loss function, start, stop)` per run of members with one loss."""
    slices = []
    for start, training in enumerate(group):
        if slices and slices[-1][0] == training.loss:
            slices[-1][2] = start + 1
        else:
            slices.append([training.loss, start, start + 1])
    return [
        (training_lib.loss_function(loss, config), start, stop)
        for loss, start, stop in slices
    ]
