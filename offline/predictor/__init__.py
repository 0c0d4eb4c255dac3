"""Building and evaluating the predictor artifact offline (the service is services/predictor)."""
