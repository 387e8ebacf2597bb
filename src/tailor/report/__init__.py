"""Human-readable reports of training runs (report.md in the run directory)."""

from tailor.report.markdown import comparison_lines, render_report, write_report

__all__ = ["comparison_lines", "render_report", "write_report"]
