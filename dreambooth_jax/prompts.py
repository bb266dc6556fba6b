"""What a run says: its identifier, its instance / class / preview prompts, learned tokens.

Shared by the trainer and by `finetuned.FineTuned` (sampling, evaluation), so a
prompt means the same thing in training and afterwards. The identifier of a
workdir is chosen once and stored in `identifier.json`; a resumed run, the
sample CLI and the evaluation read it back and check it still tokenizes to the
same ids.
"""

from __future__ import annotations

from dreambooth_jax import identifiers, methods, utils

IDENTIFIER_FILE = "identifier.json"


class IdentifierError(utils.UserError):
  """The workdir's identifier and the config or tokenizer disagree."""


def instance_and_class(config, identifier) -> tuple[str, str]:
  """("a [V] dog", "a dog") of a config, with the identifier filled in."""
  s = config.subject
  return (identifiers.instance_prompt(identifier, s.class_noun, template=s.instance_template),
          identifiers.class_prompt(s.class_noun, template=s.class_template))


def previews(config, identifier) -> list[str]:
  """The sample-grid prompts of a run (config.log.sample_prompts, filled in)."""
  templates = list(config.log.sample_prompts)
  if "{class_noun}" not in config.subject.instance_template:  # the identifier is the subject
    templates = [t.replace("{identifier} {class_noun}", "{identifier}") for t in templates]
  return [t.format(identifier=str(identifier), class_noun=config.subject.class_noun)
          for t in templates]


def has_learned(tokenizer, prompt: str) -> bool:
  """Whether `prompt` holds a learned (textual-inversion) token of `tokenizer`."""
  return any(token in prompt for token in tokenizer.learned_tokens)


def resolve_identifier(config, tokenizer, workdir) -> identifiers.Identifier:
  """The identifier of `workdir`: the stored one on resume; else the learned token, a
  user-given word, or sampled rare tokens (seeded), stored for later."""
  path = utils.as_path(workdir) / IDENTIFIER_FILE
  s = config.subject
  if path.exists():
    ident = identifiers.Identifier.from_json(path.read_text())
    ident.verify(tokenizer)
    if s.identifier and s.identifier != ident.text:
      raise IdentifierError(f"{workdir} was trained with identifier {ident.text!r}, but "
                            f"config.subject.identifier={s.identifier!r}; use a new --workdir.")
    return ident
  if methods.uses_learned_tokens(config):
    token = config.learned_token.text
    ident = identifiers.Identifier(token, tuple(tokenizer.encode(token, add_eos=False)),
                                   "learned",
                                   pieces=(config.learned_token.init_word or s.class_noun,))
  else:
    ident = identifiers.from_settings(
        tokenizer, s.identifier, class_noun=s.class_noun, template=s.instance_template,
        num_tokens=s.identifier_tokens, seed=config.seed, id_range=s.identifier_id_range)
  utils.write_text(path, ident.to_json())
  return ident


def read_identifier(workdir) -> identifiers.Identifier:
  """The identifier stored in a training workdir."""
  path = utils.as_path(workdir) / IDENTIFIER_FILE
  if not path.exists():
    raise IdentifierError(f"{workdir} has no {IDENTIFIER_FILE}: training never started there")
  return identifiers.Identifier.from_json(path.read_text())


def fill(config, identifier, prompt: str) -> str:
  """'[V]' -> the identifier. When the identifier stands for the whole subject (an instance
  template without {class_noun}, as textual inversion's "a photo of <dog*>"), "[V] dog"
  becomes just the identifier, so benchmark prompts fit every method."""
  ident = str(identifier)
  prompt = prompt.replace("[V]", ident)
  if "{class_noun}" not in config.subject.instance_template:
    prompt = prompt.replace(f"{ident} {config.subject.class_noun}", ident)
  return prompt
