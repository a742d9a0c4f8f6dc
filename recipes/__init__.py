"""zoo.recipes: Lightning modules, data modules and LightningCLI YAML configs."""
