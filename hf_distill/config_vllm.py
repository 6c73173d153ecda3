"""The vLLM fields of [`DistillationConfig`]: an optional fast path for the student's on-policy samples.

Same names and defaults as `trl.DistillationConfig` (none of them is an `SFTConfig` field). vLLM only generates the
student's completions (`lmbda > 0`), as in trl.DistillationTrainer; the teacher's (`seq_kd`) use `transformers`
`generate`, and the combination is refused. See `hf_distill/generation/vllm_backend.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VLLM_MODES = ("colocate", "server")


@dataclass
class VLLMFields:
    """Mixed into [`DistillationConfig`]; documented there."""

    use_vllm: bool = field(
        default=False,
        metadata={"help": "Generate the student's on-policy completions (`lmbda > 0`) with vLLM (pip install vllm)."},
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "'colocate' (a vLLM engine in the training process, sharing its GPU) or 'server' (a separate "
            "`trl vllm-serve` process).",
            "choices": list(VLLM_MODES),
        },
    )
    vllm_model_impl: str = field(
        default="vllm",
        metadata={"help": "Model implementation of the vLLM engine: 'vllm' or 'transformers'."},
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={"help": "Colocate mode: offload the engine's weights and KV cache between generations."},
    )
    vllm_structured_outputs_regex: str | None = field(
        default=None, metadata={"help": "Regex constraining the generated completions (vLLM structured outputs)."}
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "Server mode: base URL of the vLLM server (overrides host and port)."},
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: host of the vLLM server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: port of the vLLM server."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Server mode: seconds to wait for the vLLM server to be up."}
    )
    vllm_group_port: int = field(
        default=51216, metadata={"help": "Server mode: port of the weight-update group (NCCL communicator)."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Colocate mode: fraction of GPU memory the vLLM engine may use, in (0, 1]."}
    )
    vllm_max_model_length: int | None = field(
        default=None,
        metadata={"help": "Colocate mode: context length of the engine (prompt + completion); default: the model's."},
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "Colocate mode: GPUs per engine (must divide the number of processes)."}
    )

    def _validate_vllm_fields(self) -> None:
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(
                f"`vllm_mode={self.vllm_mode!r}` is not supported: use 'colocate' (an engine in the training process) "
                "or 'server' (a separate `trl vllm-serve` process)."
            )
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"`vllm_gpu_memory_utilization` must be in (0, 1], got {self.vllm_gpu_memory_utilization}."
            )
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"`vllm_tensor_parallel_size` must be >= 1, got {self.vllm_tensor_parallel_size}.")
        if self.vllm_max_model_length is not None and self.vllm_max_model_length <= 0:
            raise ValueError(f"`vllm_max_model_length` must be a positive integer, got {self.vllm_max_model_length}.")
        if not self.vllm_server_timeout > 0:
            raise ValueError(f"`vllm_server_timeout` must be > 0 seconds, got {self.vllm_server_timeout}.")
        if not self.use_vllm:
            return
        if self.seq_kd:
            raise ValueError(
                "`use_vllm=True` generates the student's completions only (as in trl.DistillationTrainer); "
                "`seq_kd=True` needs the teacher's, which would need a second vLLM engine with the teacher's weights "
                "(not supported). Drop `seq_kd` (and train on the student's samples with `lmbda`), or drop `use_vllm` "
                "(`transformers` generate serves both)."
            )
        if self.lmbda is not None and self.lmbda == 0.0:
            raise ValueError(
                "`use_vllm=True` speeds up the student's on-policy generations, but `lmbda=0` never generates them: "
                "set `lmbda > 0`, or drop `use_vllm`."
            )
