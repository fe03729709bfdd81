"""compress: plan units of work, stream them through the solver, journal them, resume."""
