"""A fixed passage of plain English prose for perplexity checks (scripts/fp8_quality.py).

Written for this repository (no downloads, no third-party text): essays on ordinary
subjects in ordinary sentences, about 2,400 tokens with SmolLM2's tokenizer. Change it and
every perplexity number measured on it changes: BENCHMARKS.md quotes numbers on this text.
"""

from __future__ import annotations

PARAGRAPHS = [
    # Canals
    "Before the railways, the cheapest way to move something heavy across a country was to "
    "float it. A single horse walking along a towpath could pull a barge carrying thirty tons "
    "of coal, a load that would have needed dozens of carts and many more horses on the rough "
    "roads of the time. That simple fact explains why so many canals were dug in the second "
    "half of the eighteenth century, often by men with shovels and wheelbarrows, and why towns "
    "that found themselves on a canal tended to grow while their neighbours stayed small.",
    "Building a canal was mostly a problem of water. Rivers run downhill, but a canal has to "
    "stay level for long stretches, so the engineers followed the contours of the land, "
    "winding around hills rather than going over them. Where the ground had to rise, they built "
    "locks: short chambers with gates at each end, in which a boat could be lifted or lowered "
    "by letting water in or out. Every time a boat passed through a lock, a chamber of water "
    "flowed down the hill, and that water had to be replaced from reservoirs at the summit. In "
    "a dry summer the reservoirs ran low, and traffic on the whole canal could stop for weeks.",
    "The people who worked the boats lived on them. A family might spend its whole life in a "
    "cabin smaller than a garden shed, painted with roses and castles, the children walking "
    "beside the horse as soon as they were old enough. They were paid by the load, not by the "
    "hour, so they worked from dawn until dark and often through the night. When the railways "
    "arrived, offering speed that no horse could match, the canal companies cut their prices "
    "again and again, and the boat families worked even longer hours for less money. Many "
    "canals were abandoned in the twentieth century. Some were filled in and turned into roads; "
    "others were restored by volunteers and now carry holiday boats at walking pace through "
    "quiet countryside, which would have astonished the men who dug them.",
    # Bread
    "Bread is one of the oldest prepared foods, and it is still made from the same four "
    "things: flour, water, salt and something to make it rise. When flour is mixed with water, "
    "two proteins in the wheat join together to form gluten, a stretchy network that can trap "
    "gas. Yeast, a single-celled fungus, feeds on the sugars in the flour and gives off carbon "
    "dioxide, and the gluten holds the bubbles in place, so the dough slowly swells. Kneading "
    "strengthens the network, and time does much of the same work: a wet dough left overnight "
    "in a cool place will develop almost as much structure as one kneaded by hand for ten "
    "minutes, and it will taste better, because the slow fermentation produces more flavour.",
    "In the oven, the water in the dough turns to steam and the gas in the bubbles expands, so "
    "the loaf rises quickly in the first few minutes. Then the outside dries and hardens into a "
    "crust, and the sugars and proteins on the surface react with each other and turn brown, "
    "giving the crust its colour and much of its smell. Bakers often put a tray of water in the "
    "oven or spray the walls with a mist, because a moist surface stays soft for longer and "
    "lets the loaf stretch before the crust sets. A loaf is done when it sounds hollow as you "
    "tap the bottom, although a thermometer is more reliable than an ear.",
    "For most of history, bread was leavened not with yeast bought in a packet but with a "
    "piece of dough kept back from the last batch. This starter contains wild yeasts and "
    "bacteria that live together in a stable community, and the bacteria produce acids that "
    "give sourdough its sharp taste and help the bread keep for days without going stale. A "
    "starter needs to be fed with fresh flour and water, and some bakeries claim that theirs "
    "has been fed without a break for more than a century. Whether the microbes in it are "
    "really the same ones after so many years is doubtful, but the idea is a pleasant one.",
    # Lighthouses
    "A lighthouse has two jobs. At night it warns ships away from a danger, and it also tells "
    "them exactly where they are, because every light along a coast has its own pattern. One "
    "might flash white every ten seconds, another might show two red flashes followed by a "
    "long pause, and a sailor who sees the light and counts the seconds can find it on the "
    "chart and fix the position of the ship. During the day the towers themselves serve as "
    "landmarks, which is why many of them are painted with bold stripes or bands of colour.",
    "The early lights were simply fires burning on hilltops or on top of towers, and they were "
    "weak, smoky and expensive to keep going. Candles and oil lamps were an improvement, but "
    "the real change came with the invention of a lens made from rings of glass prisms, each "
    "ring bending the light a little more than the one inside it. Such a lens could gather "
    "almost all the light from a lamp into a narrow beam and send it twenty miles out to sea. "
    "The lens floated in a bath of mercury so that it could be turned smoothly by a clockwork "
    "motor, and the keeper had to wind the weights by hand several times every night.",
    "Keepers lived at the lighthouse, sometimes with their families and sometimes, on towers "
    "built on rocks far out at sea, in small crews who were relieved every few weeks when the "
    "weather allowed a boat to land. The work was dull and unrelenting: trimming wicks, "
    "polishing brass and glass, keeping a log of the weather and the passing ships, and staying "
    "awake through the long winter nights. Today almost every lighthouse is automatic. The "
    "lamps are electric, the lenses are often replaced by small rotating beacons, and the "
    "towers are visited only now and then by a technician, or by tourists on a summer afternoon.",
    # Walking
    "There is a particular kind of thinking that happens only while walking. It is not the "
    "focused attention that a difficult problem demands at a desk, nor the drifting of the "
    "mind just before sleep, but something in between: the body is busy with the steady work "
    "of moving, and the mind, relieved of the need to sit still, wanders off on its own and "
    "comes back with ideas it would not have found otherwise. Many writers and scientists have "
    "said that their best thoughts came to them on long walks, and some of them planned their "
    "days around a walk in the afternoon, whatever the weather.",
    "A walk does not need to be long or to lead anywhere in particular. A slow circuit of a "
    "park, a route along a river, or the same streets at a different hour of the day can all "
    "do the job. What matters is that the walker is not in a hurry and is not staring at a "
    "screen. The pace should be easy enough to allow a conversation, even if there is nobody "
    "to talk to, and the route familiar enough that it needs no planning but not so familiar "
    "that nothing along it is ever noticed. After a while the small changes begin to stand "
    "out: a tree that has come into leaf, a shop that has closed, a new path worn across the "
    "grass where people have decided that the official path goes the wrong way.",
    # Libraries
    "The public library is an odd institution when you stop to think about it. Anyone may walk "
    "in from the street, sit down in a warm room, read as much as they like and then carry "
    "books home for weeks at a time, paying nothing. If the idea had been proposed for the "
    "first time today, it would probably be dismissed as impractical. Yet libraries have "
    "existed in this form for well over a century, and in that time they have taught millions "
    "of people to read, given them somewhere to study when home was too crowded or too noisy, "
    "and kept records of local history that would otherwise have been thrown away.",
    "Librarians are often asked whether libraries still matter now that so much information is "
    "available online. Their answer is usually that a library was never only a store of "
    "information. It is also a quiet public space where nobody expects you to buy anything, a "
    "place where children hear stories read aloud, where people without a computer can apply "
    "for a job or fill in a form, and where someone who does not know how to find what they "
    "need can ask a person who does. Those needs have not gone away, and in many towns the "
    "library is one of the few places left that serves all of them at once.",
    # Weather
    "Weather forecasts have improved so steadily that it is easy to forget how recent the "
    "improvement is. A forecast for five days ahead is now about as accurate as a forecast "
    "for the next day was forty years ago. The gain comes from three things working together: "
    "far more observations, from satellites, aircraft, ships, balloons and thousands of "
    "automatic stations on the ground; much faster computers, which solve the equations that "
    "describe how air moves, warms and cools; and a better understanding of the physics of "
    "clouds, rain and the exchange of heat between the air and the sea.",
    "Even so, there is a limit to how far ahead the weather can be predicted. The atmosphere is "
    "a chaotic system, which means that tiny differences in the starting conditions grow over "
    "time until they change the outcome completely. Forecasters deal with this by running the "
    "same model many times, each time with slightly different starting values, and looking at "
    "how much the results spread out. When the runs agree, the forecast can be trusted; when "
    "they scatter in all directions, the honest answer is that nobody knows, and a good "
    "forecast says so by giving a probability rather than a promise.",
    # Gardening
    "Anyone who has tried to grow vegetables learns quickly that the soil matters more than "
    "the seeds. A good soil is dark, crumbly and full of life: earthworms, fungi, bacteria and "
    "countless small creatures that break down dead leaves and roots and turn them into food "
    "for the next crop. A poor soil is either heavy clay that sets hard in summer and turns to "
    "mud in winter, or sand that lets water and nutrients drain straight through. The cure for "
    "both is the same, and it is not quick: add organic matter, such as compost or well-rotted "
    "manure, year after year, and disturb the ground as little as possible.",
    "Compost itself is nothing more than organised rot. Kitchen scraps, grass cuttings, fallen "
    "leaves and torn cardboard are piled together, kept damp and turned now and then to let "
    "air in. Microbes do the rest, and a well-made heap becomes warm enough in the middle to "
    "steam on a cold morning. After a few months, or a year if the heap is left alone, the "
    "mixture has turned into a brown, sweet-smelling material that looks nothing like what went "
    "into it. Spread on the beds in autumn, it is pulled down into the soil by the worms over "
    "the winter, and by spring the ground is ready for planting.",
    # Clocks
    "For most of history people told the time by the sun, and each town kept its own time, "
    "with noon at the moment the sun stood highest. A town a hundred miles to the west had its "
    "noon several minutes later, and nobody minded, because nobody could travel a hundred miles "
    "fast enough to notice. The railways changed that. A timetable that listed a different "
    "local time at every station was confusing, and it made collisions on single tracks more "
    "likely, so the railway companies adopted a single standard time for their whole network. "
    "Within a few decades the rest of the world followed, dividing the globe into time zones "
    "an hour apart, with a few exceptions where politics or geography made other choices.",
    "Keeping all the clocks in a country in agreement was a technical problem of its own. At "
    "first a signal was sent down the telegraph wires once a day at a fixed hour, and station "
    "masters set their clocks by it. Later, radio broadcasts carried time signals, and now the "
    "clocks in phones and computers check themselves against atomic clocks over the internet "
    "many times a day. An atomic clock counts the vibrations of atoms, which are the same "
    "everywhere and never wear out, and the best of them would lose less than a second in the "
    "lifetime of the universe. Most people never think about any of this, which is exactly what "
    "the engineers who built it intended.",
]

TEXT = "\n\n".join(PARAGRAPHS)
