"""bei's own torch modules, run packed: a batch is one token stream with cumulative sequence
lengths, so no FLOP is spent on padding. `layout` (the packed batch), `attention` (variable-length
attention), `pooling` (pooling on the packed layout), the architectures (`encoders`, `decoders`),
`heads`, and `model` (checkpoint -> module)."""
