"""Long-context evaluation (`nextlong-eval`): probes built offline in the model's tokens
(`probes`), scored teacher-forced on the training mesh (`runner`, `scoring`), reported as JSON, a
table and heatmaps (`report`)."""
