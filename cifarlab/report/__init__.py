"""Run reports: metrics over confusion matrices, figures, report.md and run comparison."""
