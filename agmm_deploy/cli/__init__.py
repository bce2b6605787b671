"""Console entry points: agmm-export, agmm-predict, agmm-bench (each: get_args_parser() and main(argv))."""
