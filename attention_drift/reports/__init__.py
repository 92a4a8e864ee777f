"""Reports over measured records: evaluation summaries and paired comparisons, the drift and patch reports (JSON and markdown), statistics. Imports core, editing and measure."""
