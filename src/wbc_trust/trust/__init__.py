"""Trust methods: robustness, Grad-CAM, Fisher sensitivity, influence, calibration and prediction sets, OOD, audit,
and the report that runs them all. Each module exposes one ``run_*`` function that writes its files and returns a
JSON-able summary; ``trust/cli.py`` maps them to ``wbc trust ...`` commands."""
