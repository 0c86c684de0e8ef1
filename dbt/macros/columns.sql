{#
  Log files are appended to for years while their writers gain columns: a column that no file has yet
  (a fresh deployment, or only files from before it was added) cannot be selected from read_parquet.
  `columns_or_null` selects each wanted column if some file has it, else a typed NULL under its name.
#}
{% macro parquet_columns(pattern) %}
  {% if not execute %}
    {{ return([]) }}
  {% endif %}
  {% set result = run_query("select column_name from (describe select * from read_parquet('" ~ pattern ~ "', union_by_name = true))") %}
  {{ return(result.columns[0].values() | list) }}
{% endmacro %}

{#- columns: (name, duckdb type) pairs; present: the names the files have. -#}
{% macro columns_or_null(columns, present) -%}
  {%- for name, type in columns %}
    {% if name in present %}cast({{ name }} as {{ type }}){% else %}cast(null as {{ type }}){% endif %} as {{ name }}{{ "," if not loop.last }}
  {%- endfor %}
{%- endmacro %}
