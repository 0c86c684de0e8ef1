{#
  The archive and the routing logs are globs of Parquet files in S3. read_parquet fails on a glob that
  matches nothing (a fresh deployment, a day without partner traffic), so staging models ask first and
  fall back to an empty relation with the same columns.
#}
{% macro archive_path(suffix) -%}
  {{ env_var('DBT_ARCHIVE_ROOT', 's3://' ~ env_var('PIPELINE_ARCHIVE_BUCKET', 'events-archive')) }}/{{ suffix }}
{%- endmacro %}

{% macro files_exist(pattern) %}
  {% if not execute %}
    {{ return(true) }}
  {% endif %}
  {% set result = run_query("select count(*) from glob('" ~ pattern ~ "')") %}
  {{ return(result.columns[0].values()[0] > 0) }}
{% endmacro %}

{#- A typed, empty relation: columns is a list of (name, duckdb type) pairs. -#}
{% macro empty_relation(columns) -%}
  select
  {%- for name, type in columns %}
    cast(null as {{ type }}) as {{ name }}{{ "," if not loop.last }}
  {%- endfor %}
  where false
{%- endmacro %}
