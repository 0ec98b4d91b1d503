"""What every target's build shares, below the targets: the plan and context a build runs in, sample
inputs and reference outputs, the ONNX export, and the manifest and files every engine is written
with. Targets call these; nothing here knows which target runs."""
