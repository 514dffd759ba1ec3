"""Other libraries' formats in and out of jep: `from jep.interop import hf` (HuggingFace-layout
MoE checkpoints). Not imported by `import jep`, so its dependencies load only when asked for."""
