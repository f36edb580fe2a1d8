"""The accuracy study: how test AUC depends on embedding width, per method and regime."""
