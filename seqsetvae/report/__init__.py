"""The evaluation report: metrics with bootstrap intervals, a gradient-boosting baseline, and figures."""
