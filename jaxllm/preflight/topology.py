"""Device topologies to compile for: TPU slices by their Cloud names, several CPU devices, or this host.

    v5p-128   v4-64       64 / 32 chips: v4 and v5p names count TensorCores, two per chip (megacore)
    v5e-256   v6e-8       256 / 8 chips: v5e (v5litepod) and v6e names count chips
    v5p:2x2x1 v5e:2x2     libtpu's own chip-grid names
    cpu-8                 8 CPU devices (XLA:CPU compiler; no libtpu needed)

A TPU topology's devices are compile-only: the TPU compiler (`libtpu`, `pip install 'jaxllm[tpu]'`) builds
executables for them on any host, with the chip's real HBM limit, collectives and layouts. `slices` > 1
describes a multi-slice job (slices joined by the data-centre network).
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re

from jaxllm.config import ConfigError

INSTALL_HINT = "pip install 'jaxllm[tpu]' (the TPU compiler, libtpu, matching the installed jax)"


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: its libtpu name, how its Cloud names count, and its HBM per chip."""
    libtpu: str               # the prefix of libtpu topology names
    cores_per_chip: int       # the Cloud name counts cores (v4, v5p) or chips (v5e, v6e)
    dims: int                 # torus dimensions
    hbm_gib: float            # what the TPU compiler allows a program (its "available HBM")
    megacore: bool            # one JAX device per chip (two TensorCores)


# HBM: the TPU compiler's own limit, read from its out-of-memory errors (libtpu 0.0.42), a little under
# the nominal 32 / 95 / 16 / 32 GiB.
CHIPS = {
    "v4": Chip("v4", 2, 3, 30.75, True),
    "v5p": Chip("v5p", 2, 3, 95.74, True),
    "v5e": Chip("v5e", 1, 2, 15.75, False),
    "v6e": Chip("v6e", 1, 2, 31.25, False),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
# device_kind of compile-only (and real) devices -> generation; the more specific names first.
DEVICE_KINDS = (("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"),
                ("TPU v5p", "v5p"), ("TPU v5", "v5p"), ("TPU v4", "v4"))
# Chip grids of the 2-D slices (v5e, v6e) by chip count.
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}


class TopologyError(ConfigError):
    """A topology name that does not describe a slice, or a compiler that cannot load."""


def _grid_3d(chips: int) -> tuple[int, ...] | None:
    """v4/v5p chip grid: the small sub-cubes, else dimensions that are multiples of 4 (whole cubes of
    4x4x4 chips), as cubic as possible (v5p-1152 = 576 chips = 4x12x12)."""
    if chips in _SMALL_3D:
        return _SMALL_3D[chips]
    if chips < 64 or chips % 64:
        return None
    cubes = chips // 64
    best = None
    for a in range(1, round(cubes ** (1 / 3)) + 2):
        for b in range(a, cubes + 1):
            if cubes % (a * b) or cubes // (a * b) < b:
                continue
            c = cubes // (a * b)
            key = (c, -a)  # the smallest largest side, then the largest smallest side
            if best is None or key < best[0]:
                best = (key, (a, b, c))
    return tuple(4 * d for d in best[1])


@dataclasses.dataclass(frozen=True)
class Topology:
    """What to compile for. `grid` is the chip grid of one slice (TPU); `count` the CPU devices."""
    name: str
    platform: str                          # tpu | cpu | local
    generation: str | None = None          # v4 | v5p | v5e | v6e
    grid: tuple[int, ...] | None = None
    count: int | None = None
    slices: int = 1

    @property
    def chip(self) -> Chip | None:
        return CHIPS.get(self.generation) if self.generation else None

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.libtpu}:{'x'.join(map(str, self.grid))}"

    @property
    def chips(self) -> int | None:
        """Chips over all slices (TPU) or CPU devices."""
        if self.platform == "tpu":
            return math.prod(self.grid) * self.slices
        return self.count

    def describe(self) -> str:
        if self.platform == "tpu":
            slices = f" × {self.slices} slices" if self.slices > 1 else ""
            return f"{self.name} ({self.libtpu_name}{slices}: {self.chips} chips, {self.chip.hbm_gib:g} GiB HBM each)"
        if self.platform == "cpu":
            return f"{self.name} ({self.count} CPU devices)"
        return "this host's devices"

    def devices(self) -> list:
        """The devices of the topology: compile-only TPU devices, CPU devices, or jax.devices()."""
        import jax
        if self.platform == "local":
            return list(jax.devices())
        if self.platform == "cpu":
            return _cpu_devices(self.count)
        return _tpu_devices(self)


def parse(name: str, slices: int = 1) -> Topology:
    """A Topology from `v5p-128`, `v5e-256`, `v4-64`, `v6e-8`, `v5litepod-16`, `v5p:2x2x1`, `v5e:2x2` or
    `cpu-N`; `slices` copies of a TPU slice for a multi-slice job. Errors say what a valid name looks like."""
    text = str(name).strip().lower()
    if slices < 1:
        raise TopologyError(f"--topology-slices must be >= 1, got {slices}")
    match = re.fullmatch(r"cpu-(\d+)", text)
    if match:
        if slices != 1:
            raise TopologyError("--topology-slices applies to TPU topologies, not cpu-N")
        count = int(match.group(1))
        if count < 1:
            raise TopologyError(f"topology {name}: need at least one CPU device")
        return Topology(name=text, platform="cpu", count=count)
    match = re.fullmatch(r"(v\d[a-z]*)([-:])([\dx]+)", text)
    if not match:
        raise TopologyError(f"topology '{name}' is not a TPU slice or cpu-N: expected e.g. v5p-128, v5e-256, "
                            f"v4-64, v6e-8, v5p:2x2x1, v5e:2x2 or cpu-8")
    generation, sep, size = match.groups()
    generation = ALIASES.get(generation, generation)
    if generation not in CHIPS:
        raise TopologyError(f"topology '{name}': unknown TPU generation '{match.group(1)}'; known: "
                            f"{', '.join(CHIPS)} (v5litepod = v5e)")
    chip = CHIPS[generation]
    if sep == ":":
        try:
            grid = tuple(int(d) for d in size.split("x"))
        except ValueError:
            grid = ()
        if len(grid) != chip.dims or min(grid, default=0) < 1:
            example = "2x2x1" if chip.dims == 3 else "2x2"
            raise TopologyError(f"topology '{name}': a {generation} chip grid has {chip.dims} sizes, e.g. "
                                f"{generation}:{example}")
    else:
        if not size.isdigit() or int(size) % chip.cores_per_chip or int(size) == 0:
            raise TopologyError(f"topology '{name}': {generation}-N counts "
                                f"{'TensorCores, two per chip, so N is even' if chip.cores_per_chip == 2 else 'chips'}")
        chips = int(size) // chip.cores_per_chip
        grid = _GRIDS_2D.get(chips) if chip.dims == 2 else _grid_3d(chips)
        if grid is None:
            sizes = (sorted(k for k in _GRIDS_2D) if chip.dims == 2 else [4, 8, 16, 32, "any multiple of 64"])
            unit = "chips" if chip.cores_per_chip == 1 else f"chips ({generation}-N has N/2 chips)"
            raise TopologyError(f"topology '{name}': {generation} slices have {', '.join(map(str, sizes))} {unit}, "
                                f"not {chips}; or name the chip grid, e.g. {generation}:"
                                + ("4x4x8" if chip.dims == 3 else "4x8"))
    return Topology(name=text, platform="tpu", generation=generation, grid=grid, slices=slices)


def local() -> Topology:
    return Topology(name="local", platform="local")


def _cpu_devices(count: int) -> list:
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", max(count, 1))
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise TopologyError(f"topology cpu-{count}: this process has {len(devices)} CPU devices (JAX started "
                            f"before --topology was read); set XLA_FLAGS=--xla_force_host_platform_device_count="
                            f"{count} or JAX_NUM_CPU_DEVICES={count}")
    return devices[:count]


def tpu_hardware_present() -> bool:
    """A TPU chip is attached to this host (its PCI device, as JAX's own check, or the accel driver)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == "0x1ae0":  # Google
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*"))


def _compiler_environment(topology: Topology) -> None:
    """Settings for loading libtpu without TPU chips: no TPU metadata server to ask, an accelerator type
    and worker list that parse (else libtpu prints initialisation errors), and no exclusive lock (a
    training process or a second test worker may hold libtpu's). Read once, when libtpu loads."""
    if tpu_hardware_present():
        return
    cloud = "v5litepod" if topology.generation == "v5e" else topology.generation
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                          f"{cloud}-{math.prod(topology.grid) * topology.chip.cores_per_chip}")


def libtpu_available() -> bool:
    import importlib.util
    return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def _tpu_devices(topology: Topology) -> list:
    from jax.experimental import topologies

    if not libtpu_available():
        raise TopologyError(f"topology {topology.name} needs the TPU compiler (libtpu), which is not installed: "
                            f"{INSTALL_HINT}")
    _compiler_environment(topology)
    chip, grid = topology.chip, topology.grid
    # A lone chip is its own host: libtpu's default host of 2x2 chips would not divide it.
    host = tuple(1 for _ in grid) if math.prod(grid) == 1 else (2, 2, 1) if chip.dims == 3 else (2, 2)
    host = host + (1,) * (3 - len(host))
    kwargs = {"chips_per_host_bounds": host,
              "wrap": tuple(g >= 16 if chip.dims == 2 else g >= 4 and math.prod(grid) >= 64 for g in grid)
              + (False,) * (3 - len(grid))}
    if chip.megacore:
        kwargs["chip_config_name"] = "megacore"
    if topology.slices > 1:
        kwargs["num_slices"] = topology.slices
    try:
        return list(topologies.get_topology_desc(topology_name=topology.libtpu_name, platform="tpu",
                                                 **kwargs).devices)
    except Exception as err:  # noqa: BLE001 - libtpu raises RuntimeError/JaxRuntimeError with its reason
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TopologyError(f"topology {topology.name}: the TPU compiler refused {topology.libtpu_name}: "
                            f"{first}") from None


def generation_of(device) -> str | None:
    kind = getattr(device, "device_kind", "")
    for key, generation in DEVICE_KINDS:
        if key.lower() in kind.lower():
            return generation
    return None


def device_memory_bytes(device, devices_on_host: int = 1) -> int:
    """What one device may hold: the TPU compiler's HBM limit for a TPU kind, the allocator's limit on a
    real accelerator, or this host's RAM shared by its CPU devices."""
    generation = generation_of(device)
    if generation is not None:
        return int(CHIPS[generation].hbm_gib * 2**30)
    if getattr(device, "platform", "") != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 - compile-only and some plugin devices have no allocator
            stats = {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(devices_on_host, 1)


def hide_absent_tpu() -> None:
    """With libtpu installed on a host without TPU chips, JAX would load it at start-up, print its
    initialisation errors, hold its lock file and only then fall back to the CPU. When JAX_PLATFORMS is
    unset and no other accelerator plugin is installed, start on the CPU directly (the TPU compiler stays
    usable for `--topology`). Call before JAX initialises its backends."""
    if os.environ.get("JAX_PLATFORMS") or not libtpu_available() or tpu_hardware_present():
        return
    import importlib.util
    from importlib.metadata import entry_points
    if list(entry_points(group="jax_plugins")) or importlib.util.find_spec("jax_plugins") is not None:
        return  # a GPU (or other) plugin is installed: let JAX choose
    os.environ["JAX_PLATFORMS"] = "cpu"
