"""Generate with every layer in this process: one reply, a stream, a batch and a conversation."""

from layerswarm import Client

with Client.connect("smollm2-135m", local=True, temperature=0, max_new_tokens=32) as client:
    print(client.generate("What is the capital of France?"))
    for piece in client.stream("Name three colours of the rainbow."):
        print(piece, end="", flush=True)
    print()
    print(client.generate_batch(["What is 2 + 2?", "What is the capital of Italy?"]))
    chat = client.chat()
    chat.send("The secret word is 'banana'.")
    print(chat.send("What is the secret word?"))
    chat.close()
