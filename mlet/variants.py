"""What an exported variant is: its number format, runtime, file and tolerance, in one table.

fp32, fp16, int8 and int4 are ONNX graphs; trt and trt-fp16 are TensorRT engines built from
the fp32 and fp16 graphs. Tolerances are the largest max abs difference of probabilities
between a variant and PyTorch on the same inputs: fp32, int8 and int4 are compared with
PyTorch running the very weights the graph holds (int8 and int4: its dequantized rows and
its float16 MLP weights), so only float32 rounding separates them; fp16 is compared with
float32 PyTorch and carries float16 rounding of weights and activations (about 5e-4 on the
demo models).
"""

from __future__ import annotations

from dataclasses import dataclass

ONNX_PLATFORM = "onnxruntime_onnx"
TENSORRT_PLATFORM = "tensorrt_plan"
MODEL_FILES = {ONNX_PLATFORM: "model.onnx", TENSORRT_PLATFORM: "model.plan"}


@dataclass(frozen=True)
class Variant:
    name: str
    platform: str
    tolerance: float
    source: str | None = None  # an engine: the ONNX variant it is built from
    max_auc_loss: float = 0.001  # test AUC a variant may lose against fp32 by default

    @property
    def is_engine(self) -> bool:
        return self.platform == TENSORRT_PLATFORM

    @property
    def model_file(self) -> str:
        return MODEL_FILES[self.platform]


VARIANTS = {
    v.name: v
    for v in (
        Variant("fp32", ONNX_PLATFORM, 1e-4),
        Variant("fp16", ONNX_PLATFORM, 5e-3),
        Variant("int8", ONNX_PLATFORM, 1e-4),
        Variant("int4", ONNX_PLATFORM, 1e-4, max_auc_loss=0.002),
        Variant("trt", TENSORRT_PLATFORM, 1e-4, source="fp32"),
        Variant("trt-fp16", TENSORRT_PLATFORM, 5e-3, source="fp16"),
    )
}
ONNX_VARIANTS = tuple(name for name, v in VARIANTS.items() if not v.is_engine)


def model_name(base: str, variant: str) -> str:
    return base if variant == "fp32" else f"{base}-{variant}"


def parse_variants(variants: tuple[str, ...] | list[str]) -> tuple[Variant, ...]:
    """The named variants, in the order given, each once; unknown names are refused."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be among {list(VARIANTS)}, got {list(variants)}")
    return tuple(VARIANTS[v] for v in dict.fromkeys(variants))
