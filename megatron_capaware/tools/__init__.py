"""Command-line tools on top of the routers: evaluation (``capaware-eval``),
LASER calibration (``capaware-calibrate``), reports and plots, the EP self-check,
router-spec parsing, text batching, and the benchmarks (:mod:`.bench`)."""
