"""ParallelDims(dp, tp, pp): the degrees of parallelism, checked against the world size."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    """Data-parallel replicas (FSDP2 shards, or DDP)."""
    tp: int = 1
    """Tensor-parallel shards of each layer (attention heads and MLP split by column/row)."""
    pp: int = 1
    """Pipeline stages (the model's layers split into consecutive groups)."""

    def validate(self, world_size: int) -> None:
        for name in ("dp", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp * self.tp * self.pp != world_size:
            raise ConfigError(
                f"dp({self.dp}) * tp({self.tp}) * pp({self.pp}) = {self.dp * self.tp * self.pp} "
                f"!= WORLD_SIZE({world_size}); launch {self.dp * self.tp * self.pp} ranks "
                f"(mpiexec -n {self.dp * self.tp * self.pp}) or change parallel.dp/tp/pp"
            )

    def build_mesh(self, device_type: str):
        """A DeviceMesh with dims ('pp', 'dp', 'tp'): tp innermost (fastest links), pp outermost."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(
            device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp")
        )
