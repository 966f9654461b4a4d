"""Batch scoring on a real local SparkSession through `mlflow.pyfunc.spark_udf`: the pandas path's answers, row for row."""

import os
import shutil
import sys

import mlflow
import numpy as np
import pytest
from conftest import build_tabcons_model, require_service

from mlflow_tabcons import flavor

pytestmark = [pytest.mark.spark, pytest.mark.slow]

ANSWER_TYPE = "prediction string, probability double, consistency double, consistency_lcb double, certified boolean"


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        require_service("Spark needs Java: no `java` on PATH and JAVA_HOME is unset")
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        require_service("pyspark is not installed (pip install 'mlflow-tabcons[spark]')")
    os.environ["PYSPARK_PYTHON"] = sys.executable  # executors must import mlflow_tabcons from this environment
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    session = (
        SparkSession.builder.master("local[2]")
        .appName("tabcons-test")
        .config("spark.driver.memory", "1g")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="module", params=["encoder", "decoder"])
def model_path(request, tabcons_model, diabetes_features, tmp_path_factory):
    """The packaged tiny BERT, and a tiny Llama read through its verbalizer."""
    model = tabcons_model if request.param == "encoder" else build_tabcons_model(request.getfixturevalue("tiny_dirs")["llama"])
    path = tmp_path_factory.mktemp("spark-model") / "model"
    flavor.save_model(model, path, input_example=diabetes_features.head(2))
    return str(path)


def test_spark_udf_returns_the_pandas_records(spark, model_path, diabetes_features):
    from pyspark.sql.functions import col, struct

    rows = diabetes_features.iloc[:12].reset_index(drop=True)
    params = {"seed": 2, "k": 12}
    expected = mlflow.pyfunc.load_model(model_path).predict(rows, params=params)
    table = spark.createDataFrame(rows.assign(row_id=range(len(rows)))).repartition(3)  # rows spread over batches
    udf = mlflow.pyfunc.spark_udf(spark, model_path, result_type=ANSWER_TYPE, env_manager="local", params=params)
    scored = table.withColumn("answer", udf(struct(*[col(c) for c in rows.columns]))).select("row_id", "answer.*")
    got = scored.toPandas().sort_values("row_id").reset_index(drop=True)
    assert len(got) == len(rows)
    assert list(got["prediction"]) == list(expected["prediction"])
    assert list(got["certified"]) == list(expected["certified"])
    # Spark hands the model other batches than pandas did: float32 padding order moves the last digits only
    for column in ("probability", "consistency", "consistency_lcb"):
        np.testing.assert_allclose(got[column], expected[column], rtol=0, atol=1e-6, err_msg=column)


def test_spark_udf_fast_path_without_scores(spark, model_path, diabetes_features):
    from pyspark.sql.functions import col, struct

    rows = diabetes_features.iloc[30:36].reset_index(drop=True)
    expected = mlflow.pyfunc.load_model(model_path).predict(rows, params={"score": False})
    udf = mlflow.pyfunc.spark_udf(spark, model_path, result_type=ANSWER_TYPE, env_manager="local", params={"score": False})
    table = spark.createDataFrame(rows.assign(row_id=range(len(rows))))
    got = table.select("row_id", udf(struct(*[col(c) for c in rows.columns])).alias("a")).select("row_id", "a.*")
    got = got.toPandas().sort_values("row_id").reset_index(drop=True)
    np.testing.assert_allclose(got["probability"], expected["probability"], rtol=0, atol=1e-6)
    assert got["consistency"].isna().all() and not got["certified"].any()
