"""Long-context evaluation (`nextlong-eval`): RULER's tasks built offline in the model's tokens
(`probes`), scored on the training mesh by greedy decoding as RULER scores them or teacher-forced
(`runner`, `scoring`), reported as JSON, tables and heatmaps (`report`)."""
