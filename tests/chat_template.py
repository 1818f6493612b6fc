"""A ChatML chat template with a thinking block, written for the tests.

Tests must run where the official template is absent (a fresh clone has no
``../shared``), so checkpoints built by the tests carry this one. It renders
what the package relies on, in the Qwen3.5 shape: ``<|im_start|>role\\n…<|im_end|>\\n``
turns, image and video placeholders, reasoning kept only for the assistant
turns after the last user message, and a generation prompt that leaves
``<think>\\n`` open when ``enable_thinking`` is true and closes an empty block
otherwise. With tools: a system block listing them (a preamble of our own
wording, one ``tojson`` schema a line), assistant ``tool_calls`` written as the
official template writes them, consecutive ``tool`` messages in one user turn
of ``<tool_response>`` blocks, and a user message made only of tool responses
not counting as the user's query. Tests that compare with the official
template read it from the reference folder and skip without it.
"""

TEST_CHAT_TEMPLATE = r"""
{%- macro text_of(content) -%}
  {%- if content is string -%}{{ content }}
  {%- elif content is none or content is undefined -%}
  {%- else -%}
    {%- for part in content -%}
      {%- if part.type == 'image' or 'image' in part -%}<|vision_start|><|image_pad|><|vision_end|>
      {%- elif part.type == 'video' or 'video' in part -%}<|vision_start|><|video_pad|><|vision_end|>
      {%- elif 'text' in part -%}{{ part.text }}
      {%- else -%}{{ raise_exception('unknown content part') }}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if not messages -%}{{ raise_exception('no messages') }}{%- endif -%}
{%- if tools -%}
  {{ '<|im_start|>system\nYou can call these tools (one JSON schema a line):\n' }}
  {%- for tool in tools -%}{{ tool | tojson }}{{ '\n' }}{%- endfor -%}
  {{ 'To call one, answer with only this, once per call:\n<tool_call>\n<function=NAME>\n<parameter=P>\nvalue\n</parameter>\n</function>\n</tool_call>' }}
  {%- if messages[0].role == 'system' and text_of(messages[0].content) | trim -%}
    {{ '\n\n' + text_of(messages[0].content) | trim }}
  {%- endif -%}
  {{ '<|im_end|>\n' }}
{%- endif -%}
{%- set last = namespace(user=-1) -%}
{%- for m in messages -%}
  {%- set body = text_of(m.content) | trim -%}
  {%- if m.role == 'user' and not (body.startswith('<tool_response>') and body.endswith('</tool_response>')) -%}
    {%- set last.user = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- set body = text_of(m.content) | trim -%}
  {%- if m.role == 'system' -%}
    {%- if not loop.first -%}{{ raise_exception('the system message comes first') }}{%- endif -%}
    {%- if '<|vision_start|>' in body -%}{{ raise_exception('System message cannot contain images.') }}{%- endif -%}
    {%- if not tools -%}{{ '<|im_start|>system\n' + body + '<|im_end|>\n' }}{%- endif -%}
  {%- elif m.role == 'user' -%}
    {{ '<|im_start|>user\n' + body + '<|im_end|>\n' }}
  {%- elif m.role == 'assistant' -%}
    {%- set thought = (m.reasoning_content if m.reasoning_content is string else '') | trim -%}
    {%- if loop.index0 > last.user -%}
      {{ '<|im_start|>assistant\n<think>\n' + thought + '\n</think>\n\n' + body }}
    {%- else -%}
      {{ '<|im_start|>assistant\n' + body }}
    {%- endif -%}
    {%- for call in m.tool_calls or [] -%}
      {%- set f = call.function if call.function is defined else call -%}
      {%- if not loop.first -%}{{ '\n' }}{%- elif body -%}{{ '\n\n' }}{%- endif -%}
      {{ '<tool_call>\n<function=' + f.name + '>\n' }}
      {%- for name, value in (f.arguments or {}) | items -%}
        {{ '<parameter=' + name + '>\n' }}
        {{- value | tojson if value is mapping or (value is sequence and value is not string) else value | string -}}
        {{ '\n</parameter>\n' }}
      {%- endfor -%}
      {{ '</function>\n</tool_call>' }}
    {%- endfor -%}
    {{ '<|im_end|>\n' }}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or loop.previtem.role != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}
    {{ '\n<tool_response>\n' + body + '\n</tool_response>' }}
    {%- if loop.last or loop.nextitem.role != 'tool' -%}{{ '<|im_end|>\n' }}{%- endif -%}
  {%- else -%}
    {{ raise_exception('unknown role ' + m.role) }}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{ '<|im_start|>assistant\n' }}
  {%- if enable_thinking is defined and enable_thinking -%}{{ '<think>\n' }}
  {%- else -%}{{ '<think>\n\n</think>\n\n' }}
  {%- endif -%}
{%- endif -%}
""".strip()
